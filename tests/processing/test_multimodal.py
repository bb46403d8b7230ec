"""Images, multi-image documents, PDFs and videos through `llm.chat` on the tiny VL model: prompt structure,
token counts, EVS, the encoder and prefix caches, and the engine's scatter of vision embeddings (its
greedy tokens equal a direct computation from the same tiles)."""

from __future__ import annotations

import base64
import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from glimpse import LLM, SamplingParams
from glimpse.errors import InvalidRequestError, LimitExceededError, MediaError
from glimpse.model.batch import ForwardBatch
from glimpse.processing import multimodal, pdf
from glimpse.processing.image import tile_grid, tile_image
from glimpse.processing.multimodal import has_media
from tests.model.nemotron_reference import new_cache

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-vl", max_num_seqs=4, max_model_len=16384)


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(img: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(img)}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def pdf_bytes(pages: int) -> bytes:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    for _ in range(pages):
        doc.new_page(612, 792)  # US letter, in points
    buf = io.BytesIO()
    doc.save(buf)
    return buf.getvalue()


def mp4(path, frames: int, fps: int = 4) -> str:
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            arr = np.full((48, 64, 3), (i * 37) % 256, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def runs_of(ids: list[int], token: int) -> list[int]:
    out, n = [], 0
    for t in ids + [-1]:
        if t == token:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def test_one_image_prompt_and_engine_scatter_match_direct_computation(llm):
    img = image(900, 600, 0)
    out = llm.chat(user(image_part(img), {"type": "text", "text": "What is this?"}), GREEDY)[0]
    tok = llm.get_tokenizer()
    cols, rows = tile_grid(900, 600)
    tiles = cols * rows + 1  # with the thumbnail
    assert out.media == [{"type": "image", "tiles": tiles, "tokens": 256 * tiles}]
    ctx = tok.convert_tokens_to_ids("<image>")
    ids = out.prompt_token_ids
    assert runs_of(ids, ctx) == [256 * tiles]
    start = ids.index(ctx)
    assert ids[start - 1] == tok.convert_tokens_to_ids("<img>")
    assert ids[start + 256 * tiles] == tok.convert_tokens_to_ids("</img>")

    # the same numbers computed directly: tiles -> encoder -> written over the placeholders -> greedy
    model = llm.engine.model
    cfg = model.config
    pixels = torch.stack(
        [torch.from_numpy(np.array(t)).permute(2, 0, 1) for t in tile_image(img, 12)]
    ).float()
    pixels = (pixels / 255 - torch.tensor(cfg.norm_mean).view(1, 3, 1, 1)) / torch.tensor(cfg.norm_std).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        vision = model.encode_images(pixels).flatten(0, 1)
        seq = list(ids)
        got = []
        for _ in range(6):
            emb = model.embed(torch.tensor(seq))
            emb[start : start + vision.shape[0]] = vision
            batch = ForwardBatch([len(seq)], [0], torch.tensor([0]), torch.arange(512).view(1, -1))
            logits = model(
                batch, new_cache(model.llm_config, slots=1, blocks=512, block_size=16), inputs_embeds=emb
            )
            got.append(int(logits[0].argmax()))
            seq.append(got[-1])
    assert out.outputs[0].token_ids == got


def test_several_images_are_numbered(llm):
    out = llm.chat(user(image_part(image(512, 512, 1)), image_part(image(1024, 512, 2)),
                        {"type": "text", "text": "Compare."}), GREEDY)[0]  # fmt: skip
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert "<image 1><img>" in text and "<image 2><img>" in text
    assert [m["tiles"] for m in out.media] == [1, 3]
    assert runs_of(out.prompt_token_ids, llm.get_tokenizer().convert_tokens_to_ids("<image>")) == [256, 768]


def test_pdf_pages_become_numbered_images(llm):
    uri = "data:application/pdf;base64," + base64.b64encode(pdf_bytes(2)).decode()
    out = llm.chat(user({"type": "file", "file": {"file_data": uri, "filename": "a.pdf"}},
                        {"type": "text", "text": "Summarise."}), GREEDY)[0]  # fmt: skip
    assert [m["page"] for m in out.media] == [1, 2]
    assert all(m["type"] == "image" and m["tokens"] == 256 * m["tiles"] for m in out.media)
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert "<image 1>" in text and "<image 2>" in text
    # the flat Responses-style part is accepted too
    flat = llm.chat(user({"type": "input_file", "file_data": uri, "filename": "a.pdf"}), GREEDY)[0]
    assert len(flat.media) == 2


def test_video_file_prompt_and_evs(llm, tmp_path):
    path = mp4(tmp_path / "v.mp4", frames=12, fps=4)  # 3 s: sampled at 2 fps -> 6 frames
    part = {"type": "video_url", "video_url": {"url": path}}
    out = llm.chat(user(part, {"type": "text", "text": "What happens?"}), GREEDY)[0]
    video = out.media[0]
    assert video["type"] == "video" and len(video["frame_indices"]) == 6
    assert out.video_tokens == {"total": 6 * 256, "kept": 6 * 256}
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert "Frame 1 sampled at 0.00 seconds: <img>" in text and "\nFrame 6 sampled at" in text

    same = llm.chat(user(part, {"type": "text", "text": "What happens?"}), GREEDY, video_pruning_rate=0.0)[0]
    assert (
        same.prompt_token_ids == out.prompt_token_ids
        and same.outputs[0].token_ids == out.outputs[0].token_ids
    )
    pruned = llm.chat(user(part, {"type": "text", "text": "What happens?"}), GREEDY, video_pruning_rate=0.75)[
        0
    ]
    assert pruned.video_tokens == {"total": 1536, "kept": 384}  # max(256, int(256 * 6 * 0.25))
    assert len(pruned.prompt_token_ids) == len(out.prompt_token_ids) - (1536 - 384)
    fewer = llm.chat(user(part), GREEDY, media_io_kwargs={"video": {"fps": 1, "num_frames": 2}})[0]
    assert len(fewer.media[0]["frame_indices"]) == 2


def test_a_repeated_frame_keeps_no_tokens_but_keeps_its_separator(llm):
    a, b = image(64, 64, 5), image(64, 64, 6)
    frames = [np.asarray(a), np.asarray(a), np.asarray(b)]  # frame 2 repeats frame 1 exactly
    q = 1 / 3  # keep int(256 * 3 * 2/3) = 512: frame 1 (always) and frame 3 (changed)
    out = llm.generate({"prompt": "<video>What changed?", "multi_modal_data": {"video": frames},
                        "video_pruning_rate": q}, GREEDY)[0]  # fmt: skip
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert "\nFrame 2: <img></img>\nFrame 3: <img><image>" in text
    assert out.video_tokens == {"total": 768, "kept": 512}


def test_encoder_cache_and_prefix_cache_reuse_a_document(llm):
    img = image(700, 500, 9)
    engine = llm.engine
    first = llm.chat(user(image_part(img), {"type": "text", "text": "What is the total?"}), GREEDY)[0]
    computed = engine.runner.num_forward_tokens
    second = llm.chat(user(image_part(img), {"type": "text", "text": "Who signed it?"}), GREEDY)[0]
    # the state after the image is snapshotted: the new question resumes there
    assert second.num_cached_tokens >= first.media[0]["tokens"]
    assert engine.runner.num_forward_tokens - computed < len(second.prompt_token_ids) // 2
    # caching changes nothing in the numbers
    fresh = LLM("tiny-vl", max_num_seqs=2, max_model_len=16384, enable_prefix_caching=False)
    again = fresh.chat(user(image_part(img), {"type": "text", "text": "Who signed it?"}), GREEDY)[0]
    assert again.outputs[0].token_ids == second.outputs[0].token_ids
    assert engine.all_memory_free()
    # without the prefix cache the encoder cache still saves the vision encoder on a repeat
    cache = fresh.engine.vision_encoder.cache
    assert (cache.hits, cache.misses) == (0, 1)
    repeat = fresh.chat(user(image_part(img), {"type": "text", "text": "Who signed it?"}), GREEDY)[0]
    assert (cache.hits, cache.misses) == (1, 1)
    assert repeat.outputs[0].token_ids == again.outputs[0].token_ids


def test_bad_media_gives_clear_errors(llm, tmp_path):
    buf = io.BytesIO()
    image(300, 300, 3).save(buf, format="PNG")
    truncated = "data:image/png;base64," + base64.b64encode(buf.getvalue()[:400]).decode()
    with pytest.raises(MediaError):
        llm.chat(user({"type": "image_url", "image_url": {"url": truncated}}), GREEDY)
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is not a video")
    with pytest.raises(MediaError):
        llm.chat(user({"type": "video_url", "video_url": {"url": str(not_video)}}), GREEDY)
    many = "data:application/pdf;base64," + base64.b64encode(pdf_bytes(33)).decode()
    with pytest.raises(LimitExceededError, match="33"):
        llm.chat(user({"type": "file", "file": {"file_data": many}}), GREEDY)
    assert llm.engine.all_memory_free()
    assert llm.chat(user({"type": "text", "text": "still fine"}), GREEDY)[0].finished


def test_text_can_not_form_a_media_placeholder(llm):
    """Text shaped like the processor's markers (with or without an image attached) stays text: the
    image is in the prompt once, and a marker with no image is no error."""
    ctx = llm.get_tokenizer().convert_tokens_to_ids("<image>")
    marker = "\x00media0\x00"
    alone = llm.chat(user({"type": "text", "text": "look: " + marker.replace("0", "7")}), GREEDY)[0]
    assert alone.media == [] and ctx not in alone.prompt_token_ids
    img = image_part(image(64, 64, 4))
    system = {"role": "system", "content": marker * 5}
    out = llm.chat([system, *user(img, {"type": "text", "text": "compare " + marker * 50})], GREEDY)[0]
    assert len(out.media) == 1 and runs_of(out.prompt_token_ids, ctx) == [256]


def test_identical_images_are_decoded_once(llm, monkeypatch):
    decoded = []
    real = multimodal.finish_image
    monkeypatch.setattr(multimodal, "finish_image", lambda *args: decoded.append(1) or real(*args))
    same, other = image_part(image(1024, 512, 7)), image_part(image(64, 64, 8))
    out = llm.chat(user(same, other, same, same, {"type": "text", "text": "Compare."}), GREEDY)[0]
    assert len(decoded) == 2  # one per distinct image
    assert [m["tiles"] for m in out.media] == [3, 1, 3, 3]
    ctx = llm.get_tokenizer().convert_tokens_to_ids("<image>")
    assert runs_of(out.prompt_token_ids, ctx) == [768, 256, 768, 768]


def test_media_over_the_context_is_refused_before_decoding(llm, tmp_path, monkeypatch):
    """The tokens media will take are counted from page sizes, image headers and the frames a video's
    metadata gives, and the request is refused (400) before anything over the context is decoded."""
    drawn = []
    real_render = pdf._render_page
    monkeypatch.setattr(pdf, "_render_page", lambda *args: drawn.append(1) or real_render(*args))
    pages = "data:application/pdf;base64," + base64.b64encode(pdf_bytes(5)).decode()  # 5 x 13 tiles
    with pytest.raises(InvalidRequestError, match="16640 prompt tokens.*16384 tokens"):
        llm.chat(user({"type": "file", "file": {"file_data": pages}}), GREEDY)
    assert drawn == []

    decoded = []
    real_finish = multimodal.finish_image
    monkeypatch.setattr(multimodal, "finish_image", lambda *args: decoded.append(1) or real_finish(*args))
    big = [image_part(image(2048, 1536, i)) for i in range(6)]  # 13 tiles each: the fifth is over
    with pytest.raises(InvalidRequestError, match="context"):
        llm.chat(user(*big), GREEDY)
    assert len(decoded) == 4

    video = {"type": "video_url", "video_url": {"url": mp4(tmp_path / "long.mp4", frames=160, fps=4)}}
    with pytest.raises(InvalidRequestError, match="context"):  # 40 s at 2 fps: 80 frames, 20,480 tokens
        llm.chat(user(video), GREEDY)
    pruned = llm.chat(user(video), GREEDY, video_pruning_rate=0.5)[0]  # EVS keeps 10,240 of them
    assert pruned.video_tokens == {"total": 80 * 256, "kept": 40 * 256}
    assert llm.engine.all_memory_free()


def test_has_media():
    assert not has_media([{"role": "user", "content": "hi"}])
    assert not has_media([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert has_media([{"role": "system", "content": "x"}, user(image_part(image(8, 8, 0)))[0]])


def test_a_long_video_is_encoded_a_group_at_a_time_between_other_work():
    """With a small token budget a 40-frame video (3 encoder groups) is encoded as its prompt chunks reach
    each group, while a text request keeps decoding; the tokens equal a run with one big step."""
    from glimpse.engine.config import EngineConfig
    from glimpse.engine.engine import LLMEngine
    from glimpse.engine.llm import input_processor
    from glimpse.engine.vision_encoder import FRAMES_PER_ENCODE

    frames = [np.asarray(image(64, 64, 100 + i)) for i in range(40)]
    prompt = {"prompt": "<video>What happens?", "multi_modal_data": {"video": frames}}
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    big = LLM("tiny-vl", max_num_seqs=4, max_model_len=16384, max_num_batched_tokens=16384)
    expected = big.generate(prompt, params)[0].outputs[0].token_ids

    engine = LLMEngine(EngineConfig.from_kwargs("tiny-vl", max_num_seqs=4, max_model_len=16384,
                                                max_num_batched_tokens=2048, enable_prefix_caching=False))  # fmt: skip
    video = input_processor(engine).from_prompt(prompt)
    engine.add_request(
        "chat", engine.tokenizer.encode("Hello there"), SamplingParams(max_tokens=30, ignore_eos=True)
    )
    engine.add_request("video", video.prompt_token_ids, params, media_spans=video.media_spans)
    misses, chat_tokens, video_out = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "chat":
                chat_tokens.append(len(out.outputs[0].token_ids))
            if out.request_id == "video" and out.finished:
                video_out = out.outputs[0].token_ids
        misses.append(engine.vision_encoder.cache.misses)
    groups = -(-40 // FRAMES_PER_ENCODE)
    assert misses[-1] == groups and misses[0] < groups  # encoded a group at a time, not all at once
    assert video_out == expected
    last_group_step = misses.index(groups)
    assert (
        chat_tokens[last_group_step] == last_group_step + 1
    )  # the chat got a token in every one of those steps
