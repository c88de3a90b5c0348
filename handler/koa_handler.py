"""TorchServe entry point of KOA-Serve: one handler class, as TorchServe requires.

It stays thin: it loads the TorchScript model and its contract on TorchServe's device and hands every
batch to `handler.service.Predictor`; a batch's answers leave as they are ready (`answer_early`).
The archive ships `model/` and `handler/` as packages beside this file. docs/MODEL.md, "The handler".
"""

from __future__ import annotations

import json
import logging
import os
import time
from http import HTTPStatus

import torch
from ts.protocol.otf_message_handler import create_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handler.drain import RETRY_AFTER_S, DrainGate
from handler.memory import keep_freed_memory
from handler.metrics import ObservedPredictor, Telemetry, TorchServeSink, load_reference
from handler.service import Answer, error_body
from handler.sites import Profiles
from model.checkpoint import load_torchscript
from model.localize import load_serving_finder
from model.markers import load_reader
from model.precision import served_models
from model.quantize import TABLE as INT8_TABLE
from model.quantize import load_table
from model.settings import EARLY_ANSWERS, TORCH_THREADS

log = logging.getLogger(__name__)

# KOA_EARLY_ANSWERS=0 answers every batch in one message, as TorchServe does by default (see `answer_early`).
EARLY_ENV = EARLY_ANSWERS.name
FINDER_WEIGHTS = "finder.pt"
MARKER_WEIGHTS = "markers.pt"
OFF = {"0", "false", "no", "off"}


class KOAHandler(BaseHandler):
    """Knee X-ray in, KL grade + probabilities (+ Captum explanation) out, per request."""

    def initialize(self, context) -> None:
        props = context.system_properties
        kept = keep_freed_memory()  # x1.22 request path at batch 16 on CPU (handler/memory.py)
        threads = TORCH_THREADS.value()
        if threads > 0:  # torch's default is one thread per core, right for one worker per machine
            torch.set_num_threads(threads)
        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        path = os.path.join(props.get("model_dir"), context.manifest["model"]["serializedFile"])
        scripted, contract = load_torchscript(path, map_location=self.device)
        # Predictions run on a frozen trace of the same weights (a quarter more images per second than the
        # exported trace on these CPUs), in bfloat16 where the processor computes it natively (about twice
        # as fast again: model.precision). Explanations need module hooks, which TorchScript lacks: they
        # use the float32 eager model rebuilt from the same weights.
        # On a CPU without native bfloat16 the ResNet trunk runs in int8 (model.quantize): the same answers,
        # a quarter less time in the grader. Its ranges were measured on training knees and ship as a table.
        int8_table = load_table(os.path.join(props.get("model_dir"), INT8_TABLE))
        eager, fast, self.dtype = served_models(scripted, contract, self.device, int8_table)
        self.model = scripted
        # The knee-joint finder ships beside the model (make archive); without it every image is graded
        # as a joint crop. It runs in the grader's number format: in float32 it took more of the request
        # path than the grader, and bfloat16 changes few of its decisions (docs/BENCHMARKS.md, number
        # format); docs/FILMS.md measures it in the format served (train.eval_finder --precision).
        finder = load_serving_finder(os.path.join(props.get("model_dir"), FINDER_WEIGHTS), self.device, self.dtype)
        if finder is None:
            log.warning("no %s in the archive: whole films will be graded as if they were joint crops", FINDER_WEIGHTS)
        # The burned-in R/L marker reader (model.markers): a whole film's knee gets its laterality from a
        # marker when the DICOM header gives none. Without it laterality comes from the header alone.
        markers = load_reader(os.path.join(props.get("model_dir"), MARKER_WEIGHTS))
        if markers is None:
            log.warning("no %s in the archive: laterality is read from DICOM headers only", MARKER_WEIGHTS)
        # Site profiles ($KOA_SITE_PROFILES, handler.sites): one made for other weights, or damaged, stops the
        # worker here with a message naming it, rather than answering with a calibration that does not fit.
        profiles = Profiles.from_env(contract)
        # Metrics and the input-drift window (handler.metrics, docs/MONITORING.md), on TorchServe's metrics port.
        self.telemetry = Telemetry(
            TorchServeSink(context.metrics, context.model_name),
            contract,
            load_reference(props.get("model_dir"), contract),
        )
        self.telemetry.start()  # koa_model_info before the first request: KoaModelNotReady reads it
        self.predictor = ObservedPredictor(
            fast, eager, contract, self.device, finder, markers=markers, profiles=profiles, telemetry=self.telemetry
        )
        self.context = context
        self.gate = DrainGate()
        warm_s = self.predictor.warm_up(int(props.get("batch_size") or 1))
        self.initialized = True
        log.info(
            "loaded %s v%s on %s in %s%s (%d torch threads), warmed up in %.1f s; malloc %s",
            contract.model_name,
            contract.model_version,
            self.device,
            str(self.dtype).removeprefix("torch."),
            " with oneDNN Graph fusion" if torch.jit.onednn_fusion_enabled() else "",
            torch.get_num_threads(),
            warm_s,
            "keeps freed memory" if kept else "default",
        )

    def handle(self, data, context) -> list[str]:
        t0 = time.perf_counter()
        headers = [context.get_all_request_header(i) for i in range(len(data))]
        results: dict[int, Answer] = {}
        self.telemetry.begin_batch()
        with self.gate.batch() as draining:
            if draining:
                message = f"KOA-Serve is restarting: send the request again in {RETRY_AFTER_S} s"
                results = dict.fromkeys(range(len(data)), (503, error_body(503, message, "restarting")))
            else:
                early = EARLY_ANSWERS.get().strip().lower() not in OFF and can_answer_early(context)
                carrier: int | None = None
                try:
                    for group in self.predictor.answers(data, headers):
                        results.update(group)
                        pending = [i for i in range(len(data)) if i not in results]
                        if not early or not pending:
                            continue
                        if carrier is None:
                            carrier = pick_carrier(pending, headers)
                            early = carrier is not None
                        ready = {i: answer for i, answer in group.items() if i != carrier}
                        if early and ready:
                            answer_early(context, ready, carrier)
                except Exception as exc:
                    # Raising would make TorchServe fail the whole batch, answered requests included.
                    log.exception("batch of %d failed after %d answers", len(data), len(results))
                    failed = (500, error_body(500, f"server error: {type(exc).__name__}: {exc}", "server_error"))
                    results = {i: results.get(i, failed) for i in range(len(data))}
        self.telemetry.end_batch(results)
        log.debug("batch of %d answered in %.1f ms", len(data), (time.perf_counter() - t0) * 1000)
        answers = []
        for i in range(len(data)):
            status, body = results.get(i) or (500, error_body(500, "no answer", "server_error"))
            set_response(context, i, status)
            answers.append(json.dumps(body))
        return answers


def set_response(context, idx: int, status: int) -> None:
    """The HTTP status, content type and (for 503) ``Retry-After`` of request ``idx``."""
    context.set_response_status(status, HTTPStatus(status).phrase, idx=idx)
    context.set_response_content_type(idx, "application/json")
    if status == 503:
        context.set_response_header(idx, "Retry-After", str(RETRY_AFTER_S))


def can_answer_early(context) -> bool:
    """Whether ``context`` is a live worker's, with the request ids and socket `answer_early` needs."""
    return isinstance(getattr(context, "request_ids", None), dict) and getattr(context, "cl_socket", None) is not None


def over_http(header: dict) -> bool:
    """Whether a request came over REST: TorchServe gives those the HTTP headers (text values, among them
    ``url_path``); a gRPC request only has its ``input`` fields' content types (dicts)."""
    return any(isinstance(value, str) for value in header.values())


def pick_carrier(pending: list[int], headers: list[dict]) -> int | None:
    """The request whose stream keeps the batch open while others are answered early (see `answer_early`).

    A REST request, as a gRPC call ends at its first message; the last one, as explanations are
    computed in request order, so it holds back no other. None when no pending request came over REST.
    """
    return next((i for i in reversed(pending) if over_http(headers[i])), None)


def answer_early(context, answers: dict[int, Answer], carrier: int) -> None:
    """Send ``answers`` to the frontend now, before ``handle`` returns.

    TorchServe 0.12 takes more than one message per batch only while a message holds a stream
    that goes on (``ts_stream_next: true``; Java ``BatchAggregator.sendResponse``): so each message
    carries, beside the answers, an empty chunk for ``carrier``, a REST request left for the final
    message. Its client gets one ordinary (chunked) HTTP answer; its status, 200, leaves with the
    first chunk, so a failed explanation of ``carrier`` arrives as a 200 with the error body (the
    clients read the error from the body). The answered requests leave ``context.request_ids``, the
    map the final message (``ts.service.Service.predict``) answers from, so none is answered twice.
    Per-request headers decide, through ``context.stopping_criteria``, which prediction streams:
    None keeps an answer whole, False makes the carrier's a chunk that goes on; the final message
    ends the carrier's stream (``create_predict_response`` turns its ``true`` into ``false``).

    Java keeps the answered requests of a batch until its last message: a worker that dies (or
    outlives ``responseTimeout``) while explaining sends them its "Worker died" error as well, onto
    connections that already have their answer (Netty closes them after an error).
    """
    for i, (status, _) in answers.items():
        set_response(context, i, status)
    set_response(context, carrier, 200)
    ids = {i: context.request_ids[i] for i in (*answers, carrier)}
    bodies = {i: json.dumps(body) for i, (_, body) in answers.items()} | {carrier: b""}
    saved = context.stopping_criteria
    context.stopping_criteria = {i: _goes_on if i == carrier else _whole for i in ids}
    try:
        message = create_predict_response(bodies, ids, "Early answers", 200, context)
    finally:
        context.stopping_criteria = saved
    context.cl_socket.sendall(message)
    for i in answers:
        del context.request_ids[i]


def _goes_on(_: object) -> bool:
    return False


def _whole(_: object) -> None:
    return None
