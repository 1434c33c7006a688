"""Where the reward model runs: in this process (local), sharded across ranks (deepspeed), or behind HTTP
(remote). Backends turn encoded samples into attributes [n, K]; they import core, never the other way round."""
