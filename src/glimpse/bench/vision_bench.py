"""The eyes of `glimpse bench`: (d) vision encoder, (e) time to first token of a 128-frame video question,
(e2) decoding 128 sampled frames from a one-hour 1080p file.

(d) `vision`: tiles/s at batch B (512² tiles, bf16 on the GPU) through the serving path
    (`NemotronVLModel.encode_images`: RADIO + pixel shuffle + projector) and through the RADIO ViT alone,
    beside the ceiling = the ViT's matmul FLOPs per tile / the matmul rate measured in the same run.
(e) `video-ttft`: T decoded frames held in memory (uint8, distinct random content) passed as a frame list
    through `multi_modal_data`, a question after them; time from the prompt to its first sampled token
    through the real LLMEngine (processing, vision, EVS, prefill), per pruning rate, with the tokens kept.
(e2) `video-decode`: the bench makes the file (one segment encoded with PyAV, then remuxed N times with
    shifted timestamps: packet copies, no re-encode) and times `decode_video` (sampled frames, scaled to
    512²) against PyAV decoding every frame in order with its default threading (capped and extrapolated
    linearly when asked, and the output says so).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from glimpse.bench.llm_bench import BenchContext, _engine, _release
from glimpse.bench.timing import time_eager
from glimpse.config_radio import RadioConfig
from glimpse.engine.llm import input_processor
from glimpse.engine.vision_encoder import normalise
from glimpse.sampling_params import SamplingParams

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- (d) vision


def vit_flops_per_tile(cfg: RadioConfig, height: int = 512, width: int = 512) -> dict[str, float]:
    """Matmul FLOPs of one tile through the RADIO ViT (2 per multiply-add), by part.

    patch embed: 2·n·(3·p²)·d; per block over t = n + prefix tokens: qkv 2·t·d·3d, proj 2·t·d², MLP
    2·2·t·d·i, attention QKᵀ and PV 2·2·t²·d (all heads together). ViT-H at 512²: 1.475 TFLOP per tile.
    """
    p = cfg.patch_size
    n = (height // p) * (width // p)
    t = n + cfg.num_prefix_tokens
    d, i, depth = cfg.hidden_size, cfg.intermediate_size, cfg.depth
    parts = {
        "patch_embed": 2 * n * cfg.patch_dim * d,
        "qkv": depth * 2 * t * d * 3 * d,
        "proj": depth * 2 * t * d * d,
        "mlp": depth * 2 * 2 * t * d * i,
        "attention": depth * 2 * 2 * t * t * d,
    }
    parts["total"] = sum(parts.values())
    return {k: float(v) for k, v in parts.items()}


def projector_flops_per_tile(model: torch.nn.Module, height: int = 512, width: int = 512) -> float:
    """The two `mlp1` matmuls over the tile's pixel-shuffled tokens (256 at 512²)."""
    rows, cols = model.vision_model.grid_size(height, width)
    proj = model.mlp1
    return (
        2.0
        * rows
        * cols
        * (proj[1].in_features * proj[1].out_features + proj[3].in_features * proj[3].out_features)
    )


def _require_vl(model: torch.nn.Module, scenario: str) -> None:
    if not getattr(model, "is_multimodal", False):
        raise ValueError(
            f"the {scenario} scenario needs a VL model: --model tiny-vl, a VL checkpoint, or "
            "--random-weights nemotron-nano-12b-v2-vl"
        )


@torch.inference_mode()
def vision(ctx: BenchContext, batch: int = 128, size: int = 512, repeats: int = 5) -> dict:
    """Tiles/s of B tiles at once, beside the ceiling from the ViT's FLOPs and the measured matmul rate."""
    model = ctx.model
    _require_vl(model, "vision")
    tower = model.vision_model
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    pixels = torch.randn(batch, 3, size, size, device=ctx.device, dtype=ctx.dtype, generator=gen)

    encode = time_eager(lambda: model.encode_images(pixels), reps=repeats, device=ctx.device)
    vit = time_eager(lambda: tower.vit(pixels), reps=repeats, device=ctx.device)
    encode_s, encode_all = encode.seconds, encode.samples_seconds
    vit_s, vit_all = vit.seconds, vit.samples_seconds
    flops = vit_flops_per_tile(tower.config, size, size)
    proj_flops = projector_flops_per_tile(model, size, size)
    ceiling = ctx.matmul_rate / flops["total"]
    encode_ceiling = ctx.matmul_rate / (flops["total"] + proj_flops)
    return {
        "scenario": "vision", "batch": batch, "tile_size": size, "dtype": str(ctx.dtype).removeprefix("torch."),
        "micro_batch": tower.max_batch, "repeats": repeats,
        "tiles_per_s": batch / encode_s, "seconds": encode_s, "seconds_all": encode_all,
        "vit_tiles_per_s": batch / vit_s, "vit_seconds": vit_s, "vit_seconds_all": vit_all,
        "vit_flops_per_tile": flops["total"], "vit_flops_by_part": flops, "projector_flops_per_tile": proj_flops,
        "ceiling_tiles_per_s": ceiling, "fraction_of_ceiling": batch / vit_s / ceiling,
        "encode_ceiling_tiles_per_s": encode_ceiling, "encode_fraction_of_ceiling": batch / encode_s / encode_ceiling,
        "matmul_TFLOPs": ctx.matmul_rate / 1e12,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------- (e) video TTFT

VIDEO_QUESTION = "<video>\nWhat happens in this video? Describe the main events in order."


def random_frames(num: int, size: int, seed: int) -> list[np.ndarray]:
    """`num` distinct HxWx3 uint8 frames: a smooth random picture that drifts, plus fresh noise per frame
    (so no two frames, and no two requests, share content; EVS still sees some frames as similar)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 16 + 2, size // 16 + 2, 3), dtype=np.uint8)
    base = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)
    frames = []
    for k in range(num):
        dy, dx = (k * 3) % 16, (k * 5) % 16
        frame = base[dy : dy + size, dx : dx + size].astype(np.int16)
        frame += rng.integers(-24, 25, (size, size, 3), dtype=np.int16)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def _first_token_seconds(engine, request_id: str, prompt: dict, params: SamplingParams, device) -> dict:
    """Process the prompt, then step the engine until the request's first token; the phases' times."""
    processed = []

    def process() -> None:
        processed.append(input_processor(engine).from_prompt(prompt))

    def until_first_token() -> None:
        inp = processed[0]
        engine.add_request(
            request_id, inp.prompt_token_ids, params, prompt=inp.prompt, media_spans=inp.media_spans,
            media_info=inp.media_info, video_tokens=inp.video_tokens,
        )  # fmt: skip
        while engine.has_unfinished():
            outs = engine.step()
            if any(o.request_id == request_id and o.outputs and o.outputs[0].token_ids for o in outs):
                return

    processing_s = time_eager(process, reps=1, warmup=0, device=device).seconds
    first_token_s = time_eager(until_first_token, reps=1, warmup=0, device=device).seconds
    while engine.has_unfinished():  # the rest of the request, untimed
        engine.step()
    inp = processed[0]
    return {"ttft_s": processing_s + first_token_s, "processing_s": processing_s,
            "prompt_tokens": len(inp.prompt_token_ids), "video_tokens": inp.video_tokens or {}}  # fmt: skip


def video_ttft(
    ctx: BenchContext,
    num_frames: int = 128,
    size: int = 512,
    rates: tuple[float, ...] = (0.0, 0.75),
    fps: float = 2.0,
    chunk: int | None = None,
    repeats: int = 1,
) -> list[dict]:
    """TTFT of a question about `num_frames` in-memory frames, at each pruning rate (fresh frames each time)."""
    model = ctx.model
    _require_vl(model, "video-ttft")
    per_frame = model.config.tokens_per_tile
    # frame separators ("Frame 12 sampled at 5.50 seconds: <img>...</img>", ~30 tokens) and the question
    longest = num_frames * (per_frame + 64) + 256
    engine = _engine(ctx, max_num_seqs=4, max_num_batched_tokens=chunk or longest, max_model_len=longest + 16)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    results = []
    try:
        for q in sorted(set(rates)):  # warm: every code path once, on a short clip
            warm = {"prompt": VIDEO_QUESTION, "multi_modal_data": {"video": random_frames(2, size, 10_000 + int(q * 100)),
                    "video_fps": fps}, "video_pruning_rate": q}  # fmt: skip
            _first_token_seconds(engine, f"warm{q}", warm, params, ctx.device)
        for q in rates:
            runs = []
            for r in range(repeats):
                frames = random_frames(num_frames, size, ctx.seed + 1000 * r + int(q * 100) + 1)
                prompt = {"prompt": VIDEO_QUESTION, "multi_modal_data": {"video": frames, "video_fps": fps},
                          "video_pruning_rate": q}  # fmt: skip
                runs.append(_first_token_seconds(engine, f"v{q}-{r}", prompt, params, ctx.device))
            # the vision encoder alone on the last clip's frames (what part of the TTFT is the eyes)
            u8 = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
            pixels = normalise(u8, model.config, ctx.device)
            encode_s = time_eager(lambda p=pixels: model.encode_video(p), reps=1, device=ctx.device).seconds
            ttfts = [x["ttft_s"] for x in runs]
            best = runs[int(np.argsort(ttfts)[len(ttfts) // 2])]
            vt = best["video_tokens"]
            results.append({
                "scenario": "video_ttft", "frames": num_frames, "frame_size": size, "pruning_rate": q,
                "ttft_s": float(np.median(ttfts)), "ttft_s_all": ttfts, "processing_s": best["processing_s"],
                "encode_video_s": encode_s, "prompt_tokens": best["prompt_tokens"],
                "video_tokens": vt.get("total"), "video_tokens_kept": vt.get("kept"),
                "chunk": engine.cfg.scheduler.max_num_batched_tokens, "repeats": repeats,
            })  # fmt: skip
    finally:
        _release(engine)
    return results


# -------------------------------------------------------------------------------------- (e2) video decode


@dataclass(frozen=True)
class LongVideoSpec:
    """The file (e2) decodes: `segments` copies of one encoded segment, remuxed end to end."""

    width: int = 1920
    height: int = 1080
    fps: int = 30
    segment_seconds: float = 60.0
    segments: int = 60
    keyint: int = 60  # a keyframe every 2 s at 30 fps
    codec: str = "auto"  # libx264 when PyAV has it, else mpeg4
    preset: str = "veryfast"  # libx264 only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width % 2 or self.height % 4 or self.width < 16 or self.height < 16:
            raise ValueError(f"the long video's size must be at least 16x16, width even and height a multiple "
                             f"of 4 (yuv420p planes), got {self.width}x{self.height}")  # fmt: skip
        if self.segments < 1 or self.frames_per_segment < 1 or self.keyint < 1:
            raise ValueError("the long video needs at least one segment of at least one frame")

    @property
    def frames_per_segment(self) -> int:
        return round(self.segment_seconds * self.fps)

    def resolved_codec(self) -> str:
        import av

        if self.codec != "auto":
            return self.codec
        return "libx264" if "libx264" in av.codecs_available else "mpeg4"

    def file_name(self) -> str:
        return (f"long-{self.width}x{self.height}-{self.fps}fps-{self.segment_seconds:g}sx{self.segments}-"
                f"k{self.keyint}-{self.resolved_codec()}-{self.preset}-s{self.seed}.mp4")  # fmt: skip


def _moving_frames(spec: LongVideoSpec):
    """yuv420p planes stacked as PyAV wants them ([H·3/2, W] uint8): a smooth random picture panning,
    a bright square crossing it, and a little fresh grain each frame (content an encoder must work at)."""
    w, h = spec.width, spec.height
    rng = np.random.default_rng(spec.seed)
    margin = 256

    def plane(ph: int, pw: int, block: int) -> np.ndarray:
        coarse = rng.integers(
            16, 236, ((ph + margin) // block + 2, (pw + margin) // block + 2), dtype=np.uint8
        )
        return np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)

    luma, cb, cr = plane(h, w, 32), plane(h // 2, w // 2, 16), plane(h // 2, w // 2, 16)
    grain = rng.integers(-6, 7, (8, h, w), dtype=np.int16)
    side = max(8, h // 6)
    for k in range(spec.frames_per_segment):
        dy, dx = (k * 2) % margin, (k * 3) % margin
        y = luma[dy : dy + h, dx : dx + w].astype(np.int16) + grain[k % 8]
        x0 = (k * 9) % max(1, w - side)
        y[h // 3 : h // 3 + side, x0 : x0 + side] = 230
        out = np.empty((h * 3 // 2, w), dtype=np.uint8)
        out[:h] = np.clip(y, 0, 255)
        c = (dy // 2, dx // 2)
        out[h : h + h // 4] = cb[c[0] : c[0] + h // 2, c[1] : c[1] + w // 2].reshape(h // 4, w)
        out[h + h // 4 :] = cr[c[0] : c[0] + h // 2, c[1] : c[1] + w // 2].reshape(h // 4, w)
        yield out


def _encode_segment(spec: LongVideoSpec, path: Path) -> str:
    import av

    codec = spec.resolved_codec()
    with av.open(str(path), mode="w", format="mp4") as out:
        if codec == "libx264":
            opts = {"preset": spec.preset, "crf": "23",
                    "x264-params": f"keyint={spec.keyint}:min-keyint={spec.keyint}:scenecut=0"}  # fmt: skip
            stream = out.add_stream(codec, rate=spec.fps, options=opts)
        else:
            stream = out.add_stream(codec, rate=spec.fps)
            stream.bit_rate = max(1_000_000, spec.width * spec.height * spec.fps // 10)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.codec_context.gop_size = spec.keyint
        for planes in _moving_frames(spec):
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return codec


def _remux_repeated(segment: Path, path: Path, spec: LongVideoSpec) -> None:
    """Copy the segment's packets `segments` times, each copy shifted by the segment's duration."""
    import av

    with av.open(str(segment)) as probe, av.open(str(path), mode="w", format="mp4") as out:
        template = probe.streams.video[0]
        tb = template.time_base
        span = Fraction(spec.frames_per_segment) / (Fraction(spec.fps) * tb)
        if span.denominator != 1:
            raise ValueError(f"a {spec.fps} fps segment is not a whole number of {tb} ticks")
        span = int(span)
        ostream = out.add_stream_from_template(template)
        for k in range(spec.segments):
            with av.open(str(segment)) as src:
                for packet in src.demux(src.streams.video[0]):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    packet.pts += k * span
                    packet.dts += k * span
                    packet.stream = ostream
                    out.mux(packet)


def make_long_video(spec: LongVideoSpec, work_dir: Path) -> tuple[Path, dict]:
    """Build (or reuse) the long file; returns its path and how it was made."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / spec.file_name()
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == asdict(spec) and meta.get("bytes") == path.stat().st_size:
            return path, meta | {"reused": True}
    segment = work_dir / ("segment-" + spec.file_name())
    tmp = path.with_suffix(".part.mp4")
    codecs = []

    def remux() -> None:
        _remux_repeated(segment, tmp, spec)
        tmp.replace(path)

    encode_s = time_eager(
        lambda: codecs.append(_encode_segment(spec, segment)), reps=1, warmup=0, device="cpu"
    )
    remux_s = time_eager(remux, reps=1, warmup=0, device="cpu")
    segment.unlink(missing_ok=True)
    meta = {"spec": asdict(spec), "codec": codecs[0], "bytes": path.stat().st_size,
            "encode_segment_s": encode_s.seconds, "remux_s": remux_s.seconds}  # fmt: skip
    meta_path.write_text(json.dumps(meta, indent=2))
    return path, meta | {"reused": False}


class _DecodeLog(logging.Handler):
    """Catches decode_video's debug record (frames decoded, seeks), when it writes one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.decoded: int | None = None
        self.seeks: int | None = None
        self.groups: int | None = None  # threads that decoded at once, where decode_video says

    def emit(self, record: logging.LogRecord) -> None:
        self.decoded = getattr(record, "decoded_frames", self.decoded)
        self.seeks = getattr(record, "seeks", self.seeks)
        self.groups = getattr(record, "decode_groups", self.groups)


def _decode_sampled(path: Path, fps: float, num_frames: int, size: int) -> tuple[float, int, _DecodeLog]:
    from glimpse.processing.video_decode import decode_video

    logger = logging.getLogger("glimpse.processing.video_decode")
    handler, level, propagate = _DecodeLog(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the record is for us, not for the console
    clips = []

    def decode() -> None:
        clips.append(decode_video(str(path), fps, num_frames, max_frames=max(1024, num_frames), size=size))

    try:
        seconds = time_eager(decode, reps=1, warmup=0, device="cpu").seconds
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    return seconds, clips[0].num_frames, handler


def _decode_every_frame(
    path: Path, indices: list[int], size: int, max_frames: int | None
) -> tuple[float, int]:
    """PyAV with its default threading: every frame in order; the sampled ones scaled to size² like ours."""
    import av

    wanted = set(indices)
    decoded = 0

    def decode_all() -> None:
        nonlocal decoded
        with av.open(str(path)) as container:
            stream = container.streams.video[0]  # thread_type left at PyAV's default
            for frame in container.decode(stream):
                if decoded in wanted:
                    frame.reformat(width=size, height=size, format="rgb24").to_ndarray()
                decoded += 1
                if max_frames is not None and decoded >= max_frames:
                    break

    return time_eager(decode_all, reps=1, warmup=0, device="cpu").seconds, decoded


def video_decode(
    spec: LongVideoSpec,
    work_dir: Path,
    num_frames: int = 128,
    sample_fps: float = 2.0,
    size: int = 512,
    repeats: int = 3,
    baseline_seconds: float | None = 300.0,
) -> dict:
    """Glimpse's sampled decode of the long file against decoding every frame in order.

    `baseline_seconds`: decode only that much of the video in the baseline and extrapolate linearly to
    the whole file (the file is one segment repeated, so the cost per frame is the same throughout);
    None or <= 0 decodes it all.
    """
    from glimpse.processing.video import sample_frames

    path, made = make_long_video(spec, work_dir)
    total = spec.frames_per_segment * spec.segments
    indices, _, _ = sample_frames(total, spec.fps, sample_fps, num_frames)
    _decode_sampled(path, sample_fps, num_frames, size)  # warm: page cache, codec init
    runs = [_decode_sampled(path, sample_fps, num_frames, size) for _ in range(repeats)]
    ours = float(np.median([r[0] for r in runs]))
    cap = None
    if baseline_seconds and baseline_seconds > 0:
        cap = min(total, max(1, round(baseline_seconds * spec.fps)))
    if cap is not None and cap >= total:
        cap = None
    base_s, base_frames = _decode_every_frame(path, indices, size, cap)
    extrapolated = base_frames < total
    full_s = base_s * total / base_frames if extrapolated else base_s
    last = runs[-1][2]
    return {
        "scenario": "video_decode", "file": str(path), "file_bytes": made["bytes"], "codec": made["codec"],
        "width": spec.width, "height": spec.height, "fps": spec.fps, "keyint": spec.keyint,
        "duration_s": total / spec.fps, "total_frames": total, "file_reused": made["reused"],
        "encode_segment_s": made.get("encode_segment_s"), "remux_s": made.get("remux_s"),
        "sampled_frames": runs[-1][1], "sample_fps": sample_fps, "frame_size": size, "repeats": repeats,
        "glimpse_s": ours, "glimpse_s_all": [r[0] for r in runs],
        "glimpse_frames_decoded": last.decoded, "glimpse_seeks": last.seeks, "glimpse_decode_threads": last.groups,
        "baseline_s": full_s, "baseline_measured_s": base_s, "baseline_frames_decoded": base_frames,
        "baseline_extrapolated": extrapolated, "baseline_fps": base_frames / base_s,
        "speedup": full_s / ours,
    }  # fmt: skip


def spec_from_args(args) -> LongVideoSpec:
    return LongVideoSpec(
        width=args.decode_width, height=args.decode_height, fps=args.decode_fps,
        segment_seconds=args.decode_segment_seconds, segments=args.decode_segments, keyint=args.decode_keyint,
        codec=args.decode_codec, preset=args.decode_preset,
    )  # fmt: skip


def rates_from_text(text: str) -> tuple[float, ...]:
    rates = tuple(float(x) for x in text.split(",") if x.strip())
    for q in rates:
        if not 0 <= q < 1 or math.isnan(q):
            raise ValueError(f"pruning rates must be in [0, 1), got {q}")
    return rates
