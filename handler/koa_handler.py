"""TorchServe entry point of KOA-Serve: one handler class, as TorchServe requires.

It stays thin: it loads the TorchScript model and its input contract on the device TorchServe
assigns, then hands every batch to `handler.service.Predictor`, which decodes, preprocesses
(with `model/`, exactly as training did), predicts and explains each request on its own.
The archive ships `model/` and `handler/` as packages beside this file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from http import HTTPStatus

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler.drain import RETRY_AFTER_S, DrainGate
from handler.memory import keep_freed_memory
from handler.service import Predictor, error_body
from model import create_model
from model.checkpoint import load_torchscript

log = logging.getLogger(__name__)


class KOAHandler(BaseHandler):
    """Knee X-ray in, KL grade + probabilities (+ Captum explanation) out, per request."""

    def initialize(self, context) -> None:
        props = context.system_properties
        kept = keep_freed_memory()  # x1.22 request path at batch 16 on CPU (handler/memory.py)
        threads = int(os.environ.get("KOA_TORCH_THREADS", "0"))
        if threads > 0:  # torch's default is one thread per core, right for one worker per machine
            torch.set_num_threads(threads)
        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        path = os.path.join(props.get("model_dir"), context.manifest["model"]["serializedFile"])
        scripted, contract = load_torchscript(path, map_location=self.device)
        # Explanations need module hooks, which TorchScript lacks: rebuild the eager model from the
        # same weights (the traced module's state dict has the eager module's keys).
        eager = create_model(contract.model_name, num_classes=contract.num_classes, in_chans=contract.channels)
        eager.load_state_dict(scripted.state_dict())
        eager.to(self.device).eval()
        self.model = scripted
        self.predictor = Predictor(scripted, eager, contract, self.device)
        self.context = context
        self.gate = DrainGate()
        warm_s = self.warm_up(scripted, contract, int(props.get("batch_size") or 1))
        self.initialized = True
        log.info(
            "loaded %s v%s on %s (%d torch threads), warmed up in %.1f s; malloc %s",
            contract.model_name,
            contract.model_version,
            self.device,
            torch.get_num_threads(),
            warm_s,
            "keeps freed memory" if kept else "default",
        )

    def warm_up(self, scripted: torch.nn.Module, contract, max_batch: int) -> float:
        """Run the model twice at batch 1, 2, 4, ... and ``max_batch`` before the first request.

        TorchScript's profiling executor optimises a graph on its first calls with a new shape;
        without this the first requests after a (re)start pay for it (measured on 2 CPU cores:
        96 ms instead of 13 ms at batch 1). Returns the seconds it took.
        """
        t0 = time.perf_counter()
        sizes = sorted({1 << k for k in range(max(max_batch, 1).bit_length()) if 1 << k <= max_batch} | {max_batch})
        with torch.inference_mode():
            for size in sizes:
                x = torch.zeros(size, contract.channels, contract.input_size, contract.input_size, device=self.device)
                for _ in range(2):
                    scripted(x)
        return time.perf_counter() - t0

    def handle(self, data, context) -> list[str]:
        t0 = time.perf_counter()
        headers = [context.get_all_request_header(i) for i in range(len(data))]
        answers = []
        with self.gate.batch() as draining:
            if draining:
                message = f"KOA-Serve is restarting: send the request again in {RETRY_AFTER_S} s"
                results = [(503, error_body(503, message, "restarting"))] * len(data)
            else:
                results = self.predictor.handle(data, headers)
        log.debug("batch of %d answered in %.1f ms", len(data), (time.perf_counter() - t0) * 1000)
        for i, (status, body) in enumerate(results):
            context.set_response_status(status, HTTPStatus(status).phrase, idx=i)
            context.set_response_content_type(i, "application/json")
            if status == 503:
                context.set_response_header(i, "Retry-After", str(RETRY_AFTER_S))
            answers.append(json.dumps(body))
        return answers
