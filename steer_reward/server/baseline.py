"""The benchmark's baseline: OpenRLHF 0.11.2's ``cli/serve_rm.py`` request handling, reimplemented minimally.

The real ``serve_rm.py`` cannot be imported here (its ``openrlhf.models`` needs flash-attn, ray and more), so this
keeps exactly what decides its throughput: ``async def get_reward`` tokenizes the request's queries
(``add_special_tokens=False``, ``padding=True``, ``truncation=True``, ``max_length``) and runs the forward
synchronously inside the handler, so requests are served one at a time in arrival order, with no batching across
requests. The reply is ``{"rewards", "scores", "extra_logs"}`` like the original. Not part of the library's
serving path; run by ``steer-reward bench --workload openrlhf-client`` only.

    python -m steer_reward.server.baseline --model DIR --port 5000 [--dtype bfloat16] [--max-len 2048] [--device cpu]
"""


import argparse

__all__ = ["build_baseline_app", "main"]


def build_baseline_app(model_dir: str, dtype: str = "bfloat16", max_len: int = 2048, device: str = "cpu"):
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from steer_reward.schema import STEERLM9

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # serve_rm.py: get_tokenizer(..., "left")
    # serve_rm reads one value head; a 9-output head is collapsed with the card's weights (same cost).
    weights = torch.tensor(STEERLM9.weight_vector("steerlm-70b"), dtype=torch.float32)
    app = FastAPI()

    def get_rewards(queries: list[str]) -> list[float]:
        batch = tokenizer(queries, return_tensors="pt", add_special_tokens=False, max_length=max_len, padding=True,
                          truncation=True)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        return (logits.float().cpu() @ weights).tolist()

    @app.post("/get_reward")
    async def get_reward(request: Request):
        data = await request.json()
        rewards = get_rewards(data.get("query"))  # synchronous in the handler, as in serve_rm.py
        return JSONResponse({"rewards": rewards, "scores": rewards, "extra_logs": {"dummy_scores": rewards}})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    uvicorn.run(build_baseline_app(args.model, args.dtype, args.max_len, args.device), host=args.host, port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
