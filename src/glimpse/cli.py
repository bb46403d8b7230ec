"""`glimpse` command line: serve | generate | chat | make-tiny | bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a local checkpoint directory, a hub id, or the built-in 'tiny' / 'tiny-vl'")
    p.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--mamba-ssm-cache-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--video-pruning-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before the last one's tokens are read back, so host work "
                        "overlaps the GPU (default: on with CUDA graphs)")  # fmt: skip
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached prompt prefixes (--no-enable-prefix-caching turns it off)")  # fmt: skip


def _llm(args: argparse.Namespace):
    from glimpse import LLM

    return LLM(
        args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype, gpu_memory_utilization=args.gpu_memory_utilization,
        video_pruning_rate=args.video_pruning_rate, seed=args.seed, enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching, async_scheduling=args.async_scheduling,
    )  # fmt: skip


def _media_parts(images: list[str], videos: list[str], pdfs: list[str]) -> list[dict]:
    parts: list[dict] = []
    for path in images:
        parts.append({"type": "image_url", "image_url": {"url": str(Path(path).resolve())}})
    for path in videos:
        parts.append({"type": "video_url", "video_url": {"url": str(Path(path).resolve())}})
    for path in pdfs:
        parts.append({"type": "file", "file": {"file_url": str(Path(path).resolve())}})
    return parts


def cmd_generate(args: argparse.Namespace) -> int:
    from glimpse import SamplingParams

    llm = _llm(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    media = _media_parts(args.image, args.video, args.pdf)
    if args.raw and not media:
        out = llm.generate(args.prompt, params)[0]
    else:
        content = [*media, {"type": "text", "text": args.prompt}] if media else args.prompt
        messages = [{"role": "user", "content": content}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        out = llm.chat(messages, params)[0]
    result = out.outputs[0]
    if args.json:
        print(json.dumps({
            "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "prompt_tokens": len(out.prompt_token_ids), "video_tokens": out.video_tokens, "media": out.media,
        }))  # fmt: skip
    else:
        print(result.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from glimpse import SamplingParams

    llm = _llm(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    pending: list[dict] = []
    print("glimpse chat: type a message; /image PATH, /video PATH, /pdf PATH attach media; /reset; /quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, pending = messages[:1] if args.system else [], []
            continue
        cmd, _, rest = line.partition(" ")
        if cmd in ("/image", "/video", "/pdf"):
            path = Path(rest.strip()).expanduser()
            if not path.is_file():
                print(f"no such file: {path}")
                continue
            kind = cmd[1:]
            pending += _media_parts(*[[str(path)] if kind == k else [] for k in ("image", "video", "pdf")])
            print(f"attached {kind}: {path}")
            continue
        content = [*pending, {"type": "text", "text": line}] if pending else line
        messages.append({"role": "user", "content": content})
        pending = []
        try:
            out = llm.chat(messages, params)[0].outputs[0]
        except Exception as e:  # a bad attachment should not end the session
            print(f"error: {e}")
            messages.pop()
            continue
        print(f"assistant> {out.text}")
        messages.append({"role": "assistant", "content": out.text})


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from glimpse.model.tiny import make_tiny

    path = make_tiny(args.dir, vl=args.vl, seed=args.seed, style=args.style, shards=args.shards)
    print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from glimpse.server.app import serve

    return serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from glimpse.bench.run import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glimpse", description="Serve Nemotron Nano 2 VL and its family.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt and print the answer")
    _engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", default=None, help="a system message (e.g. '/no_think')")
    g.add_argument("--image", action="append", default=[])
    g.add_argument("--video", action="append", default=[])
    g.add_argument("--pdf", action="append", default=[])
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal")
    _engine_args(c)
    c.add_argument("--system", default=None)
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in the real layout")
    m.add_argument("dir")
    m.add_argument("--vl", action="store_true", help="the VL model (RADIO + projector + NemotronH)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--style", default="nvidia", choices=["nvidia", "legacy", "transformers"])
    m.add_argument("--shards", type=int, default=1)
    m.set_defaults(func=cmd_make_tiny)

    s = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    _engine_args(s)
    try:
        from glimpse.server.args import add_server_args

        add_server_args(s)
    except ImportError:
        pass
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks (see docs/PERFORMANCE.md)")
    try:
        from glimpse.bench.run import add_bench_args

        add_bench_args(b)
    except ImportError:
        pass
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from glimpse.errors import CheckpointError, GlimpseError

        if isinstance(e, (GlimpseError, CheckpointError, ValueError)):
            print(f"glimpse: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
