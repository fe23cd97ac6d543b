"""Images and PDFs in a column, against the bundled server: every row's answer carries the mark of
the very image it sent (``image_tag`` of its bytes), costs follow the tile rule, bad values fail
their own row only, and the views show thumbnails."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")
pd = pytest.importorskip("pandas")

import nbparrot  # noqa: E402
from nbparrot.errors import ConfigError  # noqa: E402
from nbparrot.images import MediaOptions, MediaPart, image_tokens, thumbnail_html  # noqa: E402
from nbparrot.server import image_tag, prompt_tokens  # noqa: E402

KEY = "sk-image-test-key-0123456789"


def opts(server, **more) -> dict:
    return {"base_url": server.base_url, "api_key": KEY, "model": "mock", "progress": False, **more}


def png(size=(64, 48), color=(200, 30, 30), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, "PNG")
    return out.getvalue()


def jpeg(size=(64, 48), color=(20, 30, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def photos(tmp_path: Path, n: int, **kw) -> list[str]:
    paths = []
    for i in range(n):
        path = tmp_path / f"photo{i}.png"
        path.write_bytes(png(color=(i * 20 % 256, 100, 50), **kw))
        paths.append(str(path))
    return paths


def mark(answer: str) -> str:
    """The image marks at the start of an answer, e.g. '[image:ab12cd34]'."""
    return " ".join(word for word in answer.split() if word.startswith(("[image:", "[file:")))


def sent_png(image) -> bytes:
    """What nbparrot sends for a PIL image (or array) within the size limit: its PNG."""
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


MINIMAL_PDF = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
               b"2 0 obj << /Type /Pages /Kids [3 0 R 4 0 R] /Count 2 >> endobj\n"
               b"3 0 obj << /Type /Page /Parent 2 0 R >> endobj\n4 0 obj << /Type /Page /Parent 2 0 R >> endobj\n"
               b"trailer << /Root 1 0 R >>\n%%EOF\n")


# ---- every kind of value, each answer carrying its own image ---------------------------------


def test_paths_bytes_pil_arrays_and_urls_each_answer_carries_its_own_image(tmp_path, make_server):
    server = make_server()
    paths = photos(tmp_path, 6)
    frame = pd.DataFrame({"photo": paths})
    answers = nbparrot.map(frame, "Describe {photo}", images=["photo"], **opts(server)).result()
    assert [mark(a) for a in answers] == [f"[image:{image_tag(Path(p).read_bytes())}]" for p in paths]
    assert len(set(answers)) == 6

    as_bytes = pd.DataFrame({"raw": [Path(p).read_bytes() for p in paths[:3]] + [jpeg()]})  # found without images=
    answers = nbparrot.map(as_bytes, "Describe {raw}", **opts(server)).result()
    assert [mark(a) for a in answers] == [f"[image:{image_tag(b)}]" for b in as_bytes["raw"]]

    pictures = [Image.new("RGB", (40, 30), (i * 60, 0, 0)) for i in range(3)]
    arrays = [np.full((30, 40, 3), i * 60, dtype=np.uint8) for i in range(3)]
    frame = pd.DataFrame({"pic": pictures, "arr": arrays})
    answers = nbparrot.map(frame, "Compare {pic} with {arr}", **opts(server)).result()
    expected = [f"[image:{image_tag(sent_png(p))}] [image:{image_tag(sent_png(Image.fromarray(a)))}]"
                for p, a in zip(pictures, arrays)]
    assert [mark(a) for a in answers] == expected

    urls = [f"https://example.com/cat{i}.jpg" for i in range(3)]  # sent as is: the server fetches nothing either
    answers = nbparrot.map(pd.DataFrame({"u": urls}), "Describe {u}", images="u", **opts(server)).result()
    assert [mark(a) for a in answers] == [f"[image:{image_tag(u)}]" for u in urls]


def test_strings_are_never_guessed_to_be_images(tmp_path, make_server):
    server = make_server()
    path = photos(tmp_path, 1)[0]
    answer = nbparrot.map([{"photo": path}], "Where is {photo}?", **opts(server)).result()[0]
    assert "[image:" not in answer  # a path string stays text unless the column is named in images=
    with pytest.raises(ConfigError, match="images= names 'picture'"):
        nbparrot.map([{"photo": path}], "Describe {photo}", images=["picture"], **opts(server))
    with pytest.raises(ConfigError, match="detail must be one of"):
        nbparrot.map([{"photo": path}], "Describe {photo}", images=["photo"], detail="medium", **opts(server))
    assert server.stats()["requests"] == 1


# ---- bad values: that row's error, the others answered ---------------------------------------


def test_bad_values_fail_their_own_row_naming_it(tmp_path, make_server):
    server = make_server()
    good = photos(tmp_path, 2)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(Path(good[0]).read_bytes()[:-30])
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a picture")
    frame = pd.DataFrame({"photo": [good[0], str(tmp_path / "gone.jpg"), str(truncated), str(text_file), good[1]]})
    run = nbparrot.map(frame, "Describe {photo}", images=["photo"], **opts(server))
    answers = run.result()
    assert answers.notna().tolist() == [True, False, False, False, True]
    errors = run.errors["error"].tolist()
    assert "no such file" in errors[0] and "gone.jpg" in errors[0]
    assert "truncated" in errors[1] and "cut.png" in errors[1]
    assert "not an image or a PDF" in errors[2] and "notes.txt" in errors[2]
    assert server.stats()["requests"] == 2  # nothing was sent for the bad rows

    mixed = [{"v": png()}, {"v": "plain text"}, {"v": 12}]
    run = nbparrot.map(mixed, "Describe {v}", **opts(server))
    assert run.result()[0]["answer"].count("[image:") == 1
    assert all("'v'" in e for e in run.errors["error"])  # a string or a number in an image column: named
    run = nbparrot.map([{"v": "plain text"}, {"v": png()}], "Describe {v}", **opts(server))
    assert run.result()[0]["answer"] and "images=['v']" in run.errors["error"].iloc[0]  # never str(bytes) sent


def test_a_huge_image_is_scaled_down_before_it_is_sent(tmp_path, make_server):
    server = make_server()
    big = tmp_path / "big.png"
    Image.new("RGB", (4000, 1000), (10, 200, 10)).save(big)
    part = MediaPart(str(big), "photo", MediaOptions())
    sent = part.wire()["image_url"]["url"]
    with Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1]))) as image:
        assert image.size == (2048, 512)
    small = MediaPart(str(big), "photo", MediaOptions(max_px=600)).wire()["image_url"]["url"]
    with Image.open(io.BytesIO(base64.b64decode(small.split(",", 1)[1]))) as image:
        assert image.size == (600, 150)

    frame = pd.DataFrame({"photo": [str(big)]})
    out = nbparrot.map(frame, "Describe {photo}", images=["photo"], max_image_px=600, meta=True, **opts(server)).result()
    # the server counted the 600 x 150 image it got (2 tiles), not the 4000 x 1000 one (4 tiles)
    assert out["prompt_tokens"][0] == (len("Describe ") + 3) // 4 + 85 + 2 * 170
    assert mark(out["answer"][0]) != f"[image:{image_tag(big.read_bytes())}]"


# ---- cost before the run ---------------------------------------------------------------------


@pytest.mark.parametrize("size, detail, model, tokens", [
    ((1024, 1024), "high", "gpt-4o", 765),  # OpenAI's worked examples
    ((2048, 4096), "high", "gpt-4o", 1105),
    ((4096, 8192), "low", "gpt-4o", 85),
    ((512, 512), "auto", "gpt-4o", 255),
    ((1024, 1024), "high", "gpt-4o-mini", 2833 + 4 * 5667),
    ((1024, 1024), "low", "gpt-4o-mini", 2833),
    ((1024, 1024), "high", "gpt-4.1", 765),
    ((1024, 1024), "high", "o3", 75 + 4 * 150),
    ((1024, 1024), "high", "gpt-4.1-mini", 1659),  # 1024 patches x 1.62
    ((1800, 2400), "high", "gpt-4.1-nano", 3572),  # scaled to 1452 patches, x 2.46
    ((None, None), "high", "gpt-4o", 85 + 8 * 170),  # a URL: counted at the most
])
def test_image_tokens_follow_the_tile_rule(size, detail, model, tokens):
    assert image_tokens(*size, detail, model) == tokens


def test_the_estimate_counts_image_tokens_and_the_server_agrees(tmp_path, make_server):
    server = make_server()
    sizes = [(64, 48), (1024, 1024), (3000, 1000), (600, 600)]
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"s{i}.jpg"
        Image.new("RGB", size, (i * 40, 80, 80)).save(path, "JPEG")
        paths.append(str(path))
    frame = pd.DataFrame({"photo": paths})
    template = "Describe {photo}"
    run = nbparrot.map(frame, template, images=["photo"], meta=True, **opts(server))
    text = (len("Describe ") + 3) // 4
    # 64x48: 1 tile; 1024x1024 -> 768x768: 4; 3000x1000 -> scaled to 2048x683: 4 x 2; 600x600: 4
    images = [85 + 170, 85 + 4 * 170, 85 + 8 * 170, 85 + 4 * 170]
    framing = 4 + 3  # the estimate's per-message and reply overhead
    assert run.estimate.prompt_tokens == sum(text + framing + t for t in images)
    assert run.result()["prompt_tokens"].tolist() == [text + t for t in images]  # what the server counted

    low = nbparrot.map(frame, template, images=["photo"], detail="low", cache="off", **opts(server))
    assert low.estimate.prompt_tokens == len(sizes) * (text + framing + 85)

    nbparrot.set_price("mock-priced", input=2.50, output=10.0)
    with pytest.raises(ConfigError, match="above max_cost"):  # a batch's whole estimate, images included
        nbparrot.map(frame, template, images=["photo"], mode="batch", max_cost=0.001,
                     **{**opts(server), "model": "mock-priced"})


# ---- cache, batch, operators, PDFs ----------------------------------------------------------


def test_the_cache_keys_on_the_image_bytes(tmp_path, make_server):
    server = make_server()
    paths = photos(tmp_path, 4)
    frame = pd.DataFrame({"photo": paths})
    first = nbparrot.map(frame, "Describe {photo}", images=["photo"], **opts(server)).result()
    assert server.stats()["requests"] == 4
    Path(paths[2]).write_bytes(png(color=(1, 2, 3)))  # same path, new picture
    again = nbparrot.map(frame, "Describe {photo}", images=["photo"], **opts(server)).result()
    assert server.stats()["requests"] == 5  # only the changed image was sent again
    assert again[[0, 1, 3]].tolist() == first[[0, 1, 3]].tolist()
    assert mark(again[2]) == f"[image:{image_tag(Path(paths[2]).read_bytes())}]"


def test_batch_api_mode_sends_each_rows_image(tmp_path, make_server, monkeypatch):
    from nbparrot.batch_api import BatchEngine

    monkeypatch.setattr(BatchEngine, "max_bytes", 1500)  # a line is ~0.6 KB: several files, built one at a time
    server = make_server(batch_seconds=0.5)
    paths = photos(tmp_path, 5)
    frame = pd.DataFrame({"photo": paths + [str(tmp_path / "missing.png")]})
    run = nbparrot.map(frame, "Describe {photo}", images=["photo"], mode="batch", poll_interval=0.2, **opts(server))
    answers = run.result()
    assert [mark(a) for a in answers[:5]] == [f"[image:{image_tag(Path(p).read_bytes())}]" for p in paths]
    assert "no such file" in run.errors["error"].iloc[0]
    assert server.stats()["files_uploaded"] >= 2  # split into files, each built when it was uploaded


def test_batch_mode_builds_its_files_off_the_loop_each_image_once(tmp_path, make_server):
    """Reading, scaling and encoding the images of a batch file happens in a thread: a heartbeat on the
    same loop runs between every two lines built (the old code built all of them in one go, twice)."""
    import asyncio

    server = make_server(batch_seconds=0.2)
    paths = photos(tmp_path, 8, size=(900, 700))  # above max_image_px=512: each one is decoded and scaled

    async def scenario():
        run = nbparrot.map(pd.DataFrame({"photo": paths}), "Describe {photo}", images=["photo"], mode="batch",
                           poll_interval=0.05, max_image_px=512, cache="off", **opts(server))
        building: list[str] = []  # the note each heartbeat saw while a file was being built

        async def heartbeat():
            while True:
                note = run.progress.note or ""
                if note.startswith("building batch file"):
                    building.append(note)
                await asyncio.sleep(0)

        beat = asyncio.ensure_future(heartbeat())
        try:
            answers = await run
        finally:
            beat.cancel()
        return run, answers, building

    run, answers, building = asyncio.run(scenario())
    assert len(set(building)) == len(paths)  # it ran while each line was being built, not once at the end
    assert len(building) >= len(paths)
    sent = [Image.open(io.BytesIO(Path(p).read_bytes())) for p in paths]
    for picture in sent:
        picture.thumbnail((512, 512), Image.Resampling.LANCZOS, reducing_gap=2.0)
    assert [mark(a) for a in answers] == [f"[image:{image_tag(sent_png(p))}]" for p in sent]
    assert server.stats()["batches_created"] == 1


class CountedPath(os.PathLike):
    """A path that counts how often it is opened (``os.fspath``), to see how often an image is read."""

    def __init__(self, path: str, opened: list):
        self.path, self.opened = path, opened

    def __fspath__(self) -> str:
        self.opened.append(self.path)
        return self.path


def test_batch_mode_reads_each_image_as_often_as_a_live_run_sends_it(tmp_path, make_server):
    server = make_server(batch_seconds=0.2)
    paths = photos(tmp_path, 4, size=(900, 700))
    reads = {}
    for mode in ("live", "batch"):
        opened: list = []
        frame = pd.DataFrame({"photo": [CountedPath(p, opened) for p in paths]})
        run = nbparrot.map(frame, "Describe {photo}", images=["photo"], mode=mode, poll_interval=0.05,
                           max_image_px=512, cache="off", **opts(server))
        assert all("[image:" in a for a in run.result())
        reads[mode] = len(opened)  # planned (keyed and costed) and sent: the same in both modes
    assert reads["live"] > 0 and reads["batch"] == reads["live"]  # built once, not once to size and again to send


def test_filter_and_classify_over_images(tmp_path, make_server):
    server = make_server()
    paths = photos(tmp_path, 4)
    frame = pd.DataFrame({"photo": paths, "note": ["<<yes>>", "<<no>>", "<<yes>>", "<<no>>"]})
    kept = nbparrot.filter(frame, "Is this photo red? {photo} {note}", images=["photo"], **opts(server)).result()
    assert kept["photo"].tolist() == [paths[0], paths[2]]
    labels = nbparrot.classify(frame, "What is in {photo}? It is a cat.", ["cat", "dog"], images=["photo"],
                               **opts(server)).result()
    assert labels.tolist() == ["cat"] * 4
    assert server.stats()["requests"] == 8 and server.stats()["prompt_tokens"] >= 8 * (85 + 170)


def test_a_pdf_goes_as_a_file_part(make_server):
    server = make_server()
    docs = [MINIMAL_PDF, MINIMAL_PDF.replace(b"%%EOF", b"% two\n%%EOF")]
    run = nbparrot.map(pd.DataFrame({"doc": docs}), "Summarize {doc}", meta=True, **opts(server))
    out = run.result()
    assert [mark(a) for a in out["answer"]] == [f"[file:{image_tag(d)}]" for d in docs]
    page = 85 + 4 * 170 + 500  # a letter page's image (768 x 994: 4 tiles) and its text, 2 pages
    assert out["prompt_tokens"].tolist() == [(len("Summarize ") + 3) // 4 + 2 * page] * 2


def test_the_server_refuses_a_broken_part(make_server):
    import urllib.request

    server = make_server()
    body = {"model": "mock", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    request = urllib.request.Request(server.base_url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as caught:
        opener.open(request, timeout=10)
    assert caught.value.code == 400 and b"unsupported image" in caught.value.read()
    ok = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                            + base64.b64encode(png()).decode()}}]}]
    assert prompt_tokens(ok) == 1 + 85 + 170


# ---- pictures where people look --------------------------------------------------------------


def test_thumbnails_in_the_preview_and_the_comparison(tmp_path, make_server):
    from nbparrot.comparison import comparison_html
    from nbparrot.panel_html import _preview_html

    server = make_server()
    paths = photos(tmp_path, 3, size=(400, 300))
    for value in (paths[0], Path(paths[1]), Path(paths[2]).read_bytes(), Image.new("RGBA", (300, 200)),
                  np.zeros((20, 30), dtype=np.uint8)):
        thumb = thumbnail_html(value)
        assert thumb.startswith("<img src='data:image/jpeg;base64,")
        data = base64.b64decode(thumb.split("base64,", 1)[1].split("'", 1)[0])
        with Image.open(io.BytesIO(data)) as small:
            assert max(small.size) <= 48
    assert "src='https://example.com/a.png'" in thumbnail_html("https://example.com/a.png")
    assert ">PDF<" in thumbnail_html(MINIMAL_PDF)
    assert ">?<" in thumbnail_html(tmp_path / "nowhere.png")

    frame = pd.DataFrame({"photo": paths})
    run = nbparrot.map(frame, "Describe {photo}", images=["photo"], **opts(server))
    run.result()
    assert _preview_html(run).count("<img src='data:image/jpeg;base64,") == 3
    compare = nbparrot.map(frame, ["Describe {photo}", "Name {photo}"], images=["photo"], **opts(server))
    compare.result()
    assert comparison_html(compare, ["Describe {photo}", "Name {photo}"]).count("<img src='data:image/jpeg") == 3


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels: its signature and header chunk, no pixels."""
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


def test_a_decompression_bomb_gets_a_tag_and_the_preview_still_renders(make_server):
    """Pillow refuses a 20000 x 20000 image (a decompression bomb): the thumbnail says so, nothing raises."""
    from nbparrot.panel_html import final_html

    bomb = _png_header(20000, 20000)
    assert ">?<" in thumbnail_html(bomb)
    server = make_server()
    run = nbparrot.map(pd.DataFrame({"photo": [bomb]}), "Describe {photo}", images=["photo"], **opts(server))
    run.result()
    shown = final_html(run)
    assert "nbparrot-preview" in shown and ">?<" in shown


# ---- the magics, in a real kernel ------------------------------------------------------------


def _kernel(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import KernelHarness, kernel_python

    env = {"NBPARROT_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_API_KEY": KEY}
    return KernelHarness(python=kernel_python(None), cwd=str(tmp_path), env=env)


def test_the_example_notebook_passes_run_all(tmp_path):
    """notebooks/images.ipynb, every cell queued at once as Run All does: each answer carries its own image."""
    import time

    import nbformat

    notebook = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "images.ipynb", as_version=4)
    cells = [c.source for c in notebook.cells if c.cell_type == "code"]
    with _kernel(tmp_path) as kernel:
        ids = [kernel.execute_nowait(source) for source in cells]
        deadline = time.monotonic() + 120
        for source, msg_id in zip(cells, ids):
            result = kernel.wait(msg_id, timeout=max(1.0, deadline - time.monotonic()))
            assert result.status == "ok", (source, result.error and result.error.text)
        assert kernel.eval("[int(answers.notna().sum()), compared.status, len(result)]") == [12, "finished", 4]
        assert kernel.eval("all(f'[image:{image_tag(Path(p).read_bytes())}]' in a "
                           "for p, a in zip(df['photo'], answers))") is True


def test_llm_magic_with_an_image_variable(tmp_path, make_server):
    from harness import wait_until

    server = make_server()
    photo = tmp_path / "owl.png"
    photo.write_bytes(png(color=(90, 60, 30)))
    with _kernel(tmp_path) as kernel:
        kernel.execute(f"%load_ext nbparrot\n%config NbparrotMagics.base_url = {server.base_url!r}\n"
                       f"from pathlib import Path\nfrom PIL import Image\npath = Path({str(photo)!r})\n"
                       "pic = Image.open(path)\npic.load()", check=True)
        kernel.execute("%%llm --images path -o answer\nWhat bird is in {path}?", check=True)
        wait_until(lambda: kernel.eval("'answer' in globals()"), timeout=30, message="-o was never bound")
        assert f"[image:{image_tag(photo.read_bytes())}]" in kernel.eval("answer")
        kernel.execute("%%llm -o pair\nDescribe {pic}\n---\nName {pic}", check=True)  # a PIL image: found by type
        kernel.execute("import asyncio\nawait asyncio.wait({pair._task})", check=True, timeout=30)
        answers = kernel.eval("[o.content for o in pair.outcomes]")
        with Image.open(photo) as pic:
            assert all(f"[image:{image_tag(sent_png(pic))}]" in a for a in answers) and len(answers) == 2


def test_embeddings_refuse_an_image_column(make_server):
    server = make_server()
    with pytest.raises(ConfigError, match="embeddings take text"):
        nbparrot.embed(pd.DataFrame({"raw": [png(), png(color=(1, 1, 1))]}), "raw", **opts(server))
    assert server.stats()["requests"] == 0


def test_an_endpoint_that_refuses_image_parts_fails_the_rows_saying_why(tmp_path):
    """A real local endpoint (not the bundled one) that answers every chat request with OpenAI's 400 for a
    model without vision: each row fails with that message and a note about image / file parts."""
    import asyncio
    import threading

    from aiohttp import web

    refusal = {"error": {"message": "Invalid content type. image_url is only supported by certain models.",
                         "type": "invalid_request_error", "param": "messages.[0].content.[1].type", "code": None}}
    ready, stop, where = threading.Event(), threading.Event(), {}

    def serve() -> None:
        async def main() -> None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            async def refuse(request: web.Request) -> web.Response:
                await request.read()
                return web.json_response(refusal, status=400)

            app.router.add_post("/v1/chat/completions", refuse)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            where["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await runner.cleanup()

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        frame = pd.DataFrame({"photo": photos(tmp_path, 3)})
        run = nbparrot.map(frame, "Describe {photo}", images=["photo"], base_url=where["url"], api_key=KEY,
                           model="mock", progress=False, cache="off", max_retries=0)
        errors = run.errors["error"].tolist()
        assert len(errors) == 3
        assert all("only supported by certain models" in e and "images or PDFs as content parts" in e for e in errors)
    finally:
        stop.set()
        thread.join(10)


def test_agg_and_topk_refuse_the_image_options(tmp_path, make_server):
    server = make_server()
    frame = pd.DataFrame({"photo": photos(tmp_path, 3)})
    with pytest.raises(ConfigError, match="agg sends rows as text: images"):
        nbparrot.agg(frame, "What do {photo} show?", images=["photo"], context_tokens=10_000, **opts(server))
    with pytest.raises(ConfigError, match="topk sends rows as text: detail"):
        nbparrot.topk(frame, "the reddest {photo}", 2, detail="low", **opts(server))
    assert server.stats()["requests"] == 0
