"""The live edit service (``python -m more_lightning.serve``), run as a real subprocess on a free port with the
committed tiny LLaVA and talked to over HTTP with httpx.

One server serves the whole module (start-up is most of the cost); the tests run in file order and the last one
kills it with SIGKILL and restarts on the same state folder. The edits are VQA questions about rendered scenes of the
embedded world, retargeted to an answer the unedited model does not give; with the shipped M-ORE settings
(``configs/tiny_llava_evqa.yaml``) a single edit lands (greedy answer = the new answer).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from more_lightning.world.benchmark import _draft
from more_lightning.world.knowledge import build_knowledge
from more_lightning.world.scenes import render

from .conftest import MMEDIT
from .stream_helpers import stream_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny_llava"
TOKEN = "test-token-123"
#: the shipped embedded configs' M-ORE settings
EDITOR = "{r: 64, alpha: 128.0, eta: 0.01, lam: 1000.0, image_eta: 0.03, prior: public, pool: false, steps_per_edit: 3}"
#: a new answer per scene, of the kind its question asks for (colour, shape, fill, size)
NEW_ANSWERS = ("purple", "circle", "checked", "large")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``more_lightning.serve`` subprocess and an httpx client for it."""

    def __init__(self, config: Path, state_dir: Path, image_root: Path, log: Path) -> None:
        self.port = _free_port()
        command = [sys.executable, "-m", "more_lightning.serve", "--config", str(config), "--port", str(self.port)]
        command += ["--state-dir", str(state_dir), "--image-root", str(image_root)]
        env = {**os.environ, "MORE_EDIT_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
        self.log = log
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        self._wait()

    def _wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}):\n{self.log.read_text()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not come up in {timeout} s:\n{self.log.read_text()}")

    def edit(self, token: str | None = TOKEN, **body) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.client.post("/edit", json=body, headers=headers)

    def answer(self, **body) -> str:
        response = self.client.post("/answer", json=body)
        assert response.status_code == 200, response.text
        return response.json()["answer"]

    def stats(self) -> dict:
        return self.client.get("/stats").json()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """An image root of rendered scenes with a VQA question each, and the ways out of it a request may try."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "images"
    (root / "scenes").mkdir(parents=True)
    facts = build_knowledge()
    questions = []
    for i in range(len(NEW_ANSWERS)):
        draft = _draft("vqa", "eval", i, 0, facts)
        render(draft.scene).save(root / "scenes" / f"{i}.png")
        questions.append(draft.record["src"])
    render(_draft("vqa", "eval", 9, 0, facts).scene).save(base / "outside.png")
    (root / "out.png").symlink_to(base / "outside.png")  # inside the root, pointing out of it
    (root / "notes.png").write_text("not an image")
    config = stream_config(base / "serve.yaml", MODEL, MMEDIT, editor=EDITOR, name="serve")
    return {"base": base, "root": root, "questions": questions, "config": config, "state": base / "state"}


@pytest.fixture(scope="module")
def server(world):
    server = Server(world["config"], world["state"], world["root"], world["base"] / "server.log")
    yield server
    server.stop()


def _scene(world: dict, i: int) -> dict:
    return {"image": f"scenes/{i}.png", "question": world["questions"][i]}


def test_health(server):
    response = server.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "edits": 0, "editor": "MORE", "backbone": f"LlavaBackbone:{MODEL}"}


def test_edit_needs_the_token(server, world):
    edit = {**_scene(world, 0), "answer": NEW_ANSWERS[0]}
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        response = server.edit(token=token, **edit)
        assert response.status_code == 401, response.text
        assert "Authorization: Bearer" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
    basic = server.client.post("/edit", json=edit, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    # the token is checked before the body is read
    assert server.client.post("/edit", content=b"not json").status_code == 401
    assert server.stats()["edits"] == 0


def test_the_server_refuses_to_start_without_a_token(world):
    env = {k: v for k, v in os.environ.items() if k != "MORE_EDIT_TOKEN"}
    command = [sys.executable, "-m", "more_lightning.serve", "--config", str(world["config"]), "--port", "1"]
    for value in (None, "  "):
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env if value is None else {**env, "MORE_EDIT_TOKEN": value},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            "error: set MORE_EDIT_TOKEN to the token that clients of POST /edit send as 'Authorization: Bearer <token>'"
        ]


def test_an_edit_by_image_path_lands(server, world):
    query = _scene(world, 0)
    before = server.answer(**query)
    assert before != NEW_ANSWERS[0]
    response = server.edit(**query, answer=NEW_ANSWERS[0])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["edit"] == 1
    assert body["scores"]["rel"] == 100.0 and set(body["scores"]) >= {"rel", "rel_em", "t_loc", "m_loc"}
    assert server.answer(**query) == NEW_ANSWERS[0]
    assert server.answer(question=query["question"])  # text only: no image is fine for an answer


def test_an_edit_by_uploaded_bytes_lands(server, world):
    data = (world["root"] / "scenes" / "1.png").read_bytes()
    query = {"image_b64": base64.b64encode(data).decode(), "question": world["questions"][1]}
    assert server.answer(**query) != NEW_ANSWERS[1]
    response = server.edit(**query, answer=NEW_ANSWERS[1])
    assert response.status_code == 200, response.text
    assert response.json()["edit"] == 2
    assert server.answer(**query) == NEW_ANSWERS[1]
    assert server.answer(**_scene(world, 1)) == NEW_ANSWERS[1]  # the same image by path
    assert server.answer(**_scene(world, 0)) == NEW_ANSWERS[0]  # the first edit held
    # the upload is kept beside the journal, which names it
    lines = [json.loads(line) for line in (world["state"] / "journal.jsonl").read_text().splitlines()]
    assert lines[-1]["edit"] == 2 and lines[-1]["image"] is None
    assert (world["state"] / lines[-1]["image_file"]).read_bytes() == data


@pytest.mark.parametrize(
    ("image", "message", "status"),
    [
        ({"image": "../outside.png"}, "is outside the image root", 400),
        ({"image": "scenes/../../outside.png"}, "is outside the image root", 400),
        ({"image": "/etc/passwd"}, "is outside the image root", 400),
        ({"image": "out.png"}, "is outside the image root", 400),  # a symlink out
        ({"image": "scenes/9.png"}, "image file not found", 400),
        ({"image": "scenes"}, "image file not found", 400),
        ({"image": "notes.png"}, "not an image file", 400),
        ({"image_b64": "not base64!"}, "not valid base64", 400),
        ({"image_b64": base64.b64encode(b"hello").decode()}, "not an image file", 400),
        ({"image_b64": "A" * (12 * 2**20)}, "more than the limit", 413),
        ({"image": "scenes/0.png", "image_b64": "AAAA"}, "give the image once", 400),
        ({}, "an edit needs an image", 400),
    ],
)
def test_bad_images_are_refused_with_a_clear_message(server, world, image, message, status):
    edits = server.stats()["edits"]
    response = server.edit(**image, question=world["questions"][2], answer="red")
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert str(world["base"]) not in response.json()["error"]  # no server paths in the answer
    assert server.stats()["edits"] == edits


@pytest.mark.parametrize(
    ("content", "message", "status"),
    [
        (b"{not json", "the body is not valid JSON", 422),
        (b"[1, 2]", "the body must be a JSON object", 422),
        (json.dumps({"image": "scenes/0.png", "question": "q"}).encode(), "field 'answer' is missing", 422),
        (
            json.dumps({"image": "scenes/0.png", "question": "q", "answer": "a", "anwser": "b"}).encode(),
            "unknown field 'anwser'",
            422,
        ),
        (json.dumps({"image": 3, "question": "q", "answer": "a"}).encode(), "field 'image'", 422),
        (json.dumps({"image": "scenes/0.png", "question": "  ", "answer": "a"}).encode(), "'question' is empty", 400),
    ],
)
def test_bad_bodies_are_one_clear_message(server, content, message, status):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    response = server.client.post("/edit", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert message in response.json()["error"] and "Traceback" not in response.text
    assert server.client.post("/answer", content=b"{", headers=headers).status_code == 422
    assert server.client.get("/nowhere").json()["error"].startswith("no endpoint GET /nowhere")


def test_concurrent_edits_are_applied_one_at_a_time_in_order(server, world):
    from concurrent.futures import ThreadPoolExecutor

    edits = [{**_scene(world, i), "answer": NEW_ANSWERS[i]} for i in (2, 3)]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda e: server.edit(**e), edits))
    assert sorted(r.json()["edit"] for r in responses) == [3, 4]
    lines = [json.loads(line) for line in (world["state"] / "journal.jsonl").read_text().splitlines()]
    assert [line["edit"] for line in lines if "edit" in line and "event" not in line] == [1, 2, 3, 4]


def test_stats_count_edits_and_answers(server):
    stats = server.stats()
    assert stats["edits"] == stats["edits_this_run"] == 4
    assert stats["answers"] == 7  # two tests above: before, after (and text only, by path, the first edit)
    assert stats["state_bytes"] > 0 and 0 < stats["editor_seconds_per_edit"] < stats["seconds_per_edit"] < 30


def test_a_restart_goes_on_from_the_saved_state(server, world):
    """Last: kills the module's server with SIGKILL (no shutdown runs) and starts another on its state folder."""
    answers = [server.answer(**_scene(world, i)) for i in range(len(NEW_ANSWERS))]
    assert answers[:2] == list(NEW_ANSWERS[:2])
    server.stop(signal.SIGKILL)
    again = Server(world["config"], world["state"], world["root"], world["base"] / "server2.log")
    try:
        assert again.client.get("/health").json()["edits"] == 4
        assert [again.answer(**_scene(world, i)) for i in range(len(NEW_ANSWERS))] == answers
        response = again.edit(**_scene(world, 0), answer="orange")
        assert response.status_code == 200 and response.json()["edit"] == 5
        stats = again.stats()
        assert (stats["edits"], stats["edits_this_run"]) == (5, 1)
    finally:
        again.stop()
    lines = [json.loads(line) for line in (world["state"] / "journal.jsonl").read_text().splitlines()]
    events = [line.get("event") for line in lines]
    assert events[0] == "start" and events.count("resume") == 1 and events[-1] == "end"
    assert lines[events.index("resume")]["after_edit"] == 4
