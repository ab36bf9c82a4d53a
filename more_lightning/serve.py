"""A live edit service: edit a model over HTTP while it answers, with the engine of the edit stream.

    MORE_EDIT_TOKEN=... python -m more_lightning.serve --config configs/tiny_llava_evqa.yaml --port 8000

FastAPI on uvicorn, JSON in and out:

* ``POST /edit`` ``{"image": <path under the image root> | "image_b64": <base64 bytes>, "question": ..., "answer":
  ...}`` with ``Authorization: Bearer $MORE_EDIT_TOKEN`` writes one edit (:meth:`EditService.edit
  <more_lightning.service.EditService.edit>`: the stream's per-edit code, then journal and edit state saved) and
  returns ``{"edit": n, "scores": {...}, "loss": ..., "seconds": ...}``;
* ``POST /answer`` ``{"image" | "image_b64" (optional), "question": ...}`` returns ``{"answer": ...}``, greedy;
* ``GET /health``, ``GET /stats`` (edits applied, state bytes, seconds per edit, ...).

Edits and answers run on one worker thread, one at a time, in the order they arrived: an answer never sees a
half-written edit, and edit n+1 is written on top of edit n. Every error is a JSON ``{"error": "..."}`` that says
what to fix: 400 (a bad image or field value), 401 (no or a wrong token), 413 (too large), 422 (not JSON, a missing
or unknown field). The server refuses to start without ``MORE_EDIT_TOKEN``; a start-up problem is one ``error:`` line
and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import yaml
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from more_lightning.uploads import MAX_IMAGE_BYTES, BadImage, ImageSource

if TYPE_CHECKING:  # torch and the engine load in main(), after the token check: a refusal is immediate
    from more_lightning.service import EditService

log = logging.getLogger(__name__)

TOKEN_ENV = "MORE_EDIT_TOKEN"
#: the longest question or answer taken, in characters
MAX_TEXT = 2000
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ENDPOINTS = "the service has POST /edit, POST /answer, GET /health and GET /stats"


class EditRequest(BaseModel):
    """``POST /edit``: for this image and this question the answer is ``answer``."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="path of the image, relative to the image root")
    image_b64: str | None = Field(None, description="the image file's bytes, base64-encoded")
    question: str = Field(min_length=1, max_length=MAX_TEXT)
    answer: str = Field(min_length=1, max_length=MAX_TEXT)


class AnswerRequest(BaseModel):
    """``POST /answer``: the edited model's greedy answer to ``question`` (about the image, if one is given)."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="path of the image, relative to the image root")
    image_b64: str | None = Field(None, description="the image file's bytes, base64-encoded")
    question: str = Field(min_length=1, max_length=MAX_TEXT)


def _text(value: str, field: str) -> str:
    """``value`` with its whitespace collapsed; an empty one is refused."""
    text = " ".join(value.split())
    if not text:
        raise HTTPException(400, f"field {field!r} is empty: give it as text")
    return text


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """pydantic's errors about a request body as one sentence that names each field."""
    parts = []
    for error in errors:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        kind = error.get("type", "")
        if kind == "json_invalid":
            reason = error.get("ctx", {}).get("error", "")
            parts.append(f"the body is not valid JSON ({reason})" if reason else "the body is not valid JSON")
        elif kind == "missing":
            parts.append(f"field {field!r} is missing" if field else "the body is missing: send a JSON object")
        elif kind == "extra_forbidden":
            parts.append(f"unknown field {field!r}")
        elif not field:
            parts.append("the body must be a JSON object, sent with 'Content-Type: application/json'")
        else:
            parts.append(f"field {field!r}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(service: EditService, token: str, images: ImageSource) -> FastAPI:
    """The HTTP app around ``service``: ``/edit`` (needs ``Authorization: Bearer <token>``), ``/answer``,
    ``/health``, ``/stats``. All model work runs on one worker thread, in arrival order."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edit-engine")
    max_body = 4 * (images.max_bytes // 3 + 1) + 4 * MAX_TEXT + 4096  # the largest upload as base64, and the text

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown(wait=True)  # an edit in progress is finished, journalled and saved
        service.close()

    app = FastAPI(title="more-lightning live edit service", lifespan=lifespan)

    async def on_worker(fn, *args):
        """Run ``fn(*args)`` on the engine's worker, after everything submitted before it (FIFO)."""
        return await asyncio.wrap_future(worker.submit(fn, *args))

    def require_token(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(
                401,
                f"POST /edit needs the header 'Authorization: Bearer <token>' with the server's {TOKEN_ENV}",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body:
            return _error(413, f"the request body has {length} bytes, more than the limit of {max_body}")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, validation_message(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code in (404, 405):  # Starlette's own "Not Found" / "Method Not Allowed"
            message = f"no endpoint {request.method} {request.url.path}: {ENDPOINTS}"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(BadImage)
    async def bad_image(request: Request, exc: BadImage) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); the server log has the details")

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "edits": service.edits,
            "editor": service.editor_name,
            "backbone": service.backbone_name,
        }

    @app.get("/stats")
    async def stats() -> dict:
        return await on_worker(service.stats)

    @app.post("/edit", dependencies=[Depends(require_token)])
    async def edit(body: EditRequest) -> dict:
        from more_lightning.service import EditRejected

        question, answer = _text(body.question, "question"), _text(body.answer, "answer")
        image = images.from_request(body.image, body.image_b64, required=True)
        try:
            return await on_worker(service.edit, image, question, answer)
        except EditRejected as exc:
            raise HTTPException(400, f"the edit cannot be applied: {exc}") from exc

    @app.post("/answer")
    async def answer(body: AnswerRequest) -> dict:
        question = _text(body.question, "question")
        image = images.from_request(body.image, body.image_b64, required=False)
        return {"answer": await on_worker(service.answer, image, question)}

    return app


# --- the command ---------------------------------------------------------------------------------
class StartError(RuntimeError):
    """The service cannot start as asked; the message says what to fix."""


def resolve_config(value: str) -> Path:
    """``value`` if it is a file, else ``configs/<value>`` (as ``cli.py`` looks configs up)."""
    path = Path(value)
    if path.is_file():
        return path
    if (CONFIG_DIR / value).is_file():
        return CONFIG_DIR / value
    raise StartError(
        f"config {value} not found, nor {CONFIG_DIR / value}; give a stream config, e.g. configs/tiny_llava_evqa.yaml"
    )


def configured_image_root(config: Path) -> str | None:
    """``data.init_args.image_root`` of the config, if it sets one."""
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    data = raw.get("data") if isinstance(raw, dict) else None
    init = data.get("init_args") if isinstance(data, dict) else None
    root = init.get("image_root") if isinstance(init, dict) else None
    return str(root) if root else None


def new_state_dir(config: Path, base: Path = Path("runs")) -> Path:
    """``runs/<config name>_serve/version_N``, N one past the highest there."""
    folder = base / f"{config.stem}_serve"
    versions = [int(p.name.split("_", 1)[1]) for p in folder.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    return folder / f"version_{max(versions, default=-1) + 1}"


def build_service(args: argparse.Namespace) -> tuple[EditService, ImageSource]:
    """The engine the config describes (its module; its stream's records as the locality pool) and the image
    source; raises :class:`StartError` (or the engine's own user errors) when it cannot be built."""
    from more_lightning.data.datamodule import EditStreamDataModule
    from more_lightning.export import ExportError, build_section
    from more_lightning.module import OnlineEditModule
    from more_lightning.service import EditService

    config = resolve_config(args.config)
    root = args.image_root or configured_image_root(config)
    if root is not None and not Path(root).is_dir():
        raise StartError(f"image root {root} is not a folder: set --image-root to the folder request paths are under")
    try:
        module = build_section(config, "model", OnlineEditModule)
        records = []
        if args.locality == "data":
            datamodule = build_section(config, "data", EditStreamDataModule)
            try:
                datamodule.setup("fit")
            except FileNotFoundError as exc:
                raise StartError(f"{exc} Or start with --locality none (edits without locality samples).") from exc
            records = datamodule.stream.records
    except ExportError as exc:
        raise StartError(str(exc)) from exc
    module.to(args.device)
    state_dir = Path(args.state_dir) if args.state_dir else new_state_dir(config)
    service = EditService(module, state_dir, records, str(config))
    images = ImageSource(Path(root) if root is not None else None, max_bytes=args.max_image_bytes)
    return service, images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m more_lightning.serve",
        description=f"Serve a model for live editing over HTTP (POST /edit needs {TOKEN_ENV}; POST /answer, "
        "GET /health, GET /stats).",
    )
    parser.add_argument("--config", required=True, help="a stream config, e.g. configs/tiny_llava_evqa.yaml")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--state-dir",
        help="folder of edit_state.safetensors and journal.jsonl; a state there is continued "
        "(default: a new runs/<config name>_serve/version_N)",
    )
    parser.add_argument(
        "--image-root",
        help="folder that request image paths are relative to (default: the config's data.init_args.image_root)",
    )
    parser.add_argument(
        "--locality",
        choices=("data", "none"),
        default="data",
        help="data: each edit's loss also keeps a text and a multimodal locality sample of the config's stream, in "
        "turn (default); none: the edit's NLL alone",
    )
    parser.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    parser.add_argument(
        "--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, help=f"largest image taken (default {MAX_IMAGE_BYTES})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start the service; a start-up problem is one ``error:`` line on stderr and status 1."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        log.error(
            "error: set %s to the token that clients of POST /edit send as 'Authorization: Bearer <token>'", TOKEN_ENV
        )
        return 1
    from more_lightning.data.schema import DataFileError
    from more_lightning.errors import SettingError
    from more_lightning.service import ServiceError

    try:
        service, images = build_service(args)
    except (StartError, ServiceError, DataFileError, SettingError, FileNotFoundError) as exc:
        log.error("error: %s", " ".join(str(exc).split()))
        return 1
    import uvicorn

    pool = service.locality
    log.info(
        "locality samples: %s",
        f"those of the config's {len(pool)} stream records, in turn" if pool else "none (the edit's NLL alone)",
    )
    log.info(
        "serving %s (%s, %d edits so far) on http://%s:%d; edit state and journal in %s "
        "(to go on from them after a restart: --state-dir %s)",
        service.backbone_name,
        service.editor_name,
        service.edits,
        args.host,
        args.port,
        service.state_dir,
        service.state_dir,
    )
    uvicorn.run(create_app(service, token, images), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
