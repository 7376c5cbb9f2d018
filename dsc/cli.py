"""The `dsc` command: compile a checkpoint to a plan, inspect a plan, run a plan.

    dsc compile SOURCE -o PLAN_DIR [--target cpu|cuda|JSON] [--dtype D] [--max-batch N]
                                    [--max-seq-len N] [--init-std S]
    dsc inspect PLAN_DIR_OR_SOURCE [--html passes.html] [--rank R]
    dsc run PLAN_DIR (--text "..." [--chat] | --ids 1,2,3) [--max-new-tokens N] [--tp N]

SOURCE is a HF checkpoint directory, a `.gguf` file, a name from `dsc.zoo.names()` (random
weights) or an alias from `dsc.hub.ALIASES`. Progress goes to stderr, results to stdout. An error
dsc raises on purpose (`dsc.DscError`) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import dsc
from dsc.errors import DscError, PlanError, TargetError
from dsc.target import Target, as_target

__all__ = ["main"]

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
# Processes started for several ranks never use NVLink multicast (unsafe on the GPU hosts used).
_CHILD_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
TOKENIZER_DIR = "tokenizer"


# ---- progress ------------------------------------------------------------------------------
class _Progress:
    """Spinners on stderr for long steps, then one line per finished step with its time."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        start = time.perf_counter()
        with self.console.status(f"{label} ..."):
            yield
        self.console.print(f"[green]✓[/green] {label} ({time.perf_counter() - start:.1f} s)")

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)


# ---- target --------------------------------------------------------------------------------
def _target(args: argparse.Namespace) -> Target:
    """--target (shorthand or JSON of Target fields) with --dtype/--max-batch/--max-seq-len on top."""
    spec = args.target
    if spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise TargetError(f"--target is not valid JSON ({exc}): {args.target}") from exc
    target = as_target(spec)
    changes: dict[str, Any] = {}
    if args.dtype:
        changes["dtype"] = _DTYPE_NAMES[args.dtype]
    if args.max_batch is not None:
        changes["max_batch"] = args.max_batch
    if args.max_seq_len is not None:
        changes["max_seq_len"] = args.max_seq_len
    return dataclasses.replace(target, **changes)


def _compile_source(args: argparse.Namespace, progress: _Progress) -> tuple[Any, Any]:
    from dsc import hub

    target = _target(args)
    target.check_machine()
    with progress.step(f"Loading {args.source}"):
        model, tokenizer = hub.load_model(args.source, init_std=args.init_std)
    with progress.step(f"Compiling for {target.device} {target.dtype} (trace, passes, lowering)"):
        compiled = dsc.compile(model, target)
    return compiled, tokenizer


# ---- plan header ---------------------------------------------------------------------------
def _plan_header(path: Path) -> dict[str, Any]:
    """plan.json alone, to check tp before starting processes; dsc.load checks everything."""
    manifest = path / "plan.json"
    if not manifest.is_file():
        raise PlanError(
            f"{path} is not a dsc plan ({manifest.name} is missing); make one with "
            f"`dsc compile SOURCE -o {path}`."
        )
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{manifest} is corrupted (not valid JSON: {exc}).") from exc


def _load_plan(path: Path, progress: _Progress) -> Any:
    with progress.step(f"Loading plan {path}"):
        return dsc.load(path)


def _load_tokenizer(plan_dir: Path) -> Any:
    folder = plan_dir / TOKENIZER_DIR
    if not folder.is_dir():
        return None
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoTokenizer.from_pretrained(folder)


# ---- compile -------------------------------------------------------------------------------
def _cmd_compile(args: argparse.Namespace, argv: Sequence[str]) -> int:
    world = _target(args).world_size
    if world > 1 and not _under_torchrun():
        # Each rank compiles and saves its own part, so compiling runs one process per rank too.
        _Progress().note(f"launching {world} processes with torchrun (one per rank)")
        return _torchrun(world, argv)
    rank = int(os.environ.get("RANK", "0"))
    progress = _Progress(quiet=rank != 0)
    compiled, tokenizer = _compile_source(args, progress)
    out = Path(args.output)
    with progress.step(f"Saving plan and weights to {out}"):
        compiled.save(out)
        if tokenizer is not None and rank == 0:
            tokenizer.save_pretrained(out / TOKENIZER_DIR)
    if rank == 0:
        print(compiled.report())
        print(f"\nplan written to {out}" + (" (with tokenizer)" if tokenizer is not None else ""))
    return 0


# ---- inspect -------------------------------------------------------------------------------
def _print_entry_points(plan: Any) -> None:
    print("\n== entry points ==")
    printed: set[str] = set()
    for name, program in plan.programs.items():
        ops: dict[str, int] = {}
        for step in program.steps:
            ops[step["op"]] = ops.get(step["op"], 0) + 1
        cache = [i for i in program.inputs if i.startswith("cache.")]
        inputs = [i for i in program.inputs if not i.startswith("cache.")]
        print(
            f"\n[{name}] inputs: {', '.join(inputs)}"
            + (f" + {len(cache)} cache buffers" if cache else "")
        )
        print(f"[{name}] outputs: {', '.join(program.outputs)}; {len(program.steps)} steps")
        for op, count in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"    {count:4d}  {op}")
        if program.kernels:
            print(f"[{name}] kernel choices (implementation, nodes):")
            chosen: dict[str, list[str]] = {}
            for node, impl in program.kernels.items():
                chosen.setdefault(impl, []).append(node)
            for impl, nodes in sorted(chosen.items()):
                wrapped = textwrap.fill(
                    ", ".join(nodes), width=100, initial_indent=" " * 8, subsequent_indent=" " * 8
                )
                print(f"    {impl} x{len(nodes)}\n{wrapped}")
        else:
            print(f"[{name}] kernel choices: none (every step runs its torch implementation)")
        used = [op.removeprefix("kernel::") for op in ops if op.startswith("kernel::")]
        for kernel in used:
            source = plan.kernel_sources.get(kernel)
            if source is None or kernel in printed:
                continue
            printed.add(kernel)
            print(f"\n--- generated kernel {kernel} (kernels/{kernel}.py) ---\n{source.rstrip()}")
    rest = [k for k in plan.kernel_sources if k not in printed]
    for kernel in rest:
        print(f"\n--- generated kernel {kernel} (kernels/{kernel}.py) ---")
        print(plan.kernel_sources[kernel].rstrip())
    if not plan.kernel_sources:
        print("\ngenerated kernel sources: none")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dsc.plan import load_plan
    from dsc.report import records, report, visualize

    progress = _Progress()
    path = Path(args.source)
    if (path / "plan.json").is_file():
        # Read the plan without binding it to a device: a multi-rank plan needs no process group.
        with progress.step(f"Loading plan {path}" + (f" (rank {args.rank})" if args.rank else "")):
            plan = load_plan(path, rank=args.rank)
        history = records(plan.history)
    else:
        if _target(args).world_size > 1:
            raise TargetError(
                "inspect compiles in this one process; for several ranks run `dsc compile "
                f"{args.source} --target ... -o PLAN_DIR`, then `dsc inspect PLAN_DIR`."
            )
        compiled, _ = _compile_source(args, progress)
        plan, history = compiled.plan, compiled.history
    print(f"target: {plan.target.to_json()}")
    if plan.world_size > 1:
        print(f"rank {plan.rank} of {plan.world_size} (pick another with --rank)")
    print(f"model: {plan.model.get('name', '?')} (output {plan.model.get('output')})\n")
    print("== pass pipeline ==")
    print(report(history, plan))
    _print_entry_points(plan)
    if args.html:
        written = visualize(history, plan, args.html)
        print(f"\npass report written to {written}")
    return 0


# ---- run -----------------------------------------------------------------------------------
def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ids wants comma-separated integers, got {text!r}"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("--ids is empty")
    return ids


def _under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _leave_process_group() -> None:
    """Tear the group down before exit: a gloo group left to interpreter shutdown aborts."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _torchrun(processes: int, argv: Sequence[str]) -> int:
    """Run this same command under torchrun, one process per rank; the exit status is theirs."""
    import subprocess

    env = dict(os.environ, **_CHILD_ENV)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "dsc.cli",
        *argv,
    ]
    return subprocess.call(cmd, env=env)


class _TextStream:
    """Prints decoded text as tokens arrive; a partial UTF-8 character waits for its rest."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        if self.tokenizer is None:
            sys.stdout.write(f"{token} ")
        else:
            text = self.tokenizer.decode(
                self.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            if text.endswith("\ufffd"):
                return
            sys.stdout.write(text[len(self.shown) :])
            self.shown = text
        sys.stdout.flush()


def _prompt(args: argparse.Namespace, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if args.ids is not None:
        ids = torch.tensor([args.ids])
        return ids, torch.ones_like(ids)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DscError(f"{args.plan}'s tokenizer has no chat template; leave out --chat")
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        enc = tokenizer(args.text, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    plan_dir = Path(args.plan)
    header = _plan_header(plan_dir)
    plan_tp = int(header.get("target", {}).get("tp", 1))
    if args.tp != plan_tp:
        raise TargetError(
            f"{plan_dir} was compiled for tp={plan_tp} but --tp {args.tp} was given; run it with "
            f"--tp {plan_tp}, or compile again with --target '{{\"tp\": {args.tp}}}'."
        )
    ranks = sorted(header.get("ranks", {}), key=int)
    if args.tp > 1 and ranks != [str(r) for r in range(args.tp)]:
        raise PlanError(
            f"{plan_dir} was compiled for tp={plan_tp} but holds the part of rank(s) "
            f"{', '.join(ranks)} only; it cannot run as {args.tp} processes."
        )
    if args.text is not None and not (plan_dir / TOKENIZER_DIR).is_dir():
        raise DscError(
            f"{plan_dir} has no {TOKENIZER_DIR}/ folder, so --text cannot be tokenized; "
            "pass token ids with --ids 1,2,3"
        )
    if args.tp > 1 and not _under_torchrun():
        _Progress().note(f"launching {args.tp} processes with torchrun (one per rank)")
        return _torchrun(args.tp, argv)
    # Under torchrun, dsc.load joins the process group and picks this rank's part.
    rank = int(os.environ.get("RANK", "0"))
    progress = _Progress(quiet=rank != 0)
    tokenizer = _load_tokenizer(plan_dir)
    ids, mask = _prompt(args, tokenizer)
    compiled = _load_plan(plan_dir, progress)
    if "decode" not in compiled.plan.programs:
        out = compiled(ids, mask)
        name = compiled.info.get("output", "logits")
        value = out[name]
        if rank == 0:
            print(
                f"{name}: shape {tuple(value.shape)}, dtype {str(value.dtype).removeprefix('torch.')}"
            )
            print(f"{name}[0, 0, :8] = {[round(v, 4) for v in value[0, 0, :8].float().tolist()]}")
        return 0
    printer = _TextStream(tokenizer)
    start = time.perf_counter()
    count = 0
    for token in compiled.stream(ids, mask, max_new_tokens=args.max_new_tokens):
        count += 1
        if rank == 0:
            printer(int(token[0]))
    seconds = time.perf_counter() - start
    if rank == 0:
        sys.stdout.write("\n")
        progress.note(
            f"{count} tokens in {seconds:.2f} s ({count / seconds:.1f} tokens/s; prompt of "
            f"{ids.shape[1]} tokens, prefill and first-call warm-up included)"
        )
    return 0


# ---- argument parsing ----------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsc",
        description="dsc: a compiler for transformer inference.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    compile_opts = argparse.ArgumentParser(add_help=False)
    compile_opts.add_argument(
        "--target",
        default="cpu",
        help="'cpu', 'cuda' or JSON of dsc.Target fields, e.g. '{\"device\": \"cuda\", \"tp\": 2}'",
    )
    compile_opts.add_argument("--dtype", choices=sorted(_DTYPE_NAMES), help="override the dtype")
    compile_opts.add_argument("--max-batch", type=int, help="largest batch the plan serves")
    compile_opts.add_argument("--max-seq-len", type=int, help="longest prompt + generation")
    compile_opts.add_argument(
        "--init-std", type=float, default=None, help="zoo models: draw random weights with this std"
    )

    p = sub.add_parser(
        "compile", parents=[compile_opts], help="compile a model to a plan directory"
    )
    p.add_argument("source", help="HF checkpoint dir, .gguf file, zoo name or alias")
    p.add_argument("-o", "--output", required=True, help="plan directory to write")

    p = sub.add_parser(
        "inspect",
        parents=[compile_opts],
        help="show passes, entry points and kernels of a plan (or a source)",
    )
    p.add_argument("source", help="plan directory, or a source to compile first")
    p.add_argument("--html", help="write the pass-by-pass HTML report here")
    p.add_argument("--rank", type=int, default=0, help="which rank's part of a plan to show")

    p = sub.add_parser("run", help="run a plan: generate (decoder) or a forward pass (encoder)")
    p.add_argument("plan", help="plan directory written by `dsc compile`")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--text", help="prompt text (needs the plan's tokenizer/)")
    prompt.add_argument("--ids", type=_parse_ids, help="prompt token ids: 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap --text in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes (torchrun)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    # torch.export's pytree warns on every trace about an API transformers uses; not the user's.
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    try:
        if args.command == "compile":
            status = _cmd_compile(args, argv)
        elif args.command == "inspect":
            status = _cmd_inspect(args)
        else:
            status = _cmd_run(args, argv)
        if _under_torchrun():
            _leave_process_group()
        return status
    except DscError as exc:
        print(f"dsc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`dsc inspect ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
