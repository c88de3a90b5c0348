# KOA-Serve: every target that needs Python depends on the virtualenv, so a fresh clone
# needs no manual step. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data/koa
RUN ?= runs/oamen_pt
MODEL ?= oamen_pt
NONKNEE ?= ../shared/data/nonknee
# The recipe of the shipped weights, each setting with its reason: train/recipes/oamen_pt.py. TRAIN_ARGS
# overrides any of it (a run cut short continues with `make train TRAIN_ARGS=--resume`; on a GPU:
# make train TRAIN_ARGS="--epochs 30")
RECIPE ?= train/recipes/oamen_pt.py
TRAIN_ARGS ?=
WEIGHTS := weights/oamen.ckpt
FINDER := weights/finder.pt
MARKERS := weights/markers.pt
# The input-drift reference measured on val for the committed weights (make drift-reference, docs/MONITORING.md)
DRIFT_REF := weights/oamen.drift.json
INT8_TABLE := weights/oamen.int8.json
FILMS ?= ../shared/data/legfilms
EXPORT := build/oamen.pt
ARCHIVE := model_store/oamen.mar
# The .mar packs the model/ and handler/ packages, so it is rebuilt when any of them changes.
SOURCES := $(shell find model handler -name '*.py' 2>/dev/null)
SERVE_DIR := logs/serve
IMAGE ?= tests/fixtures/knee_kl2.png
PROTO_STAMP := koa_client/_proto/inference_pb2.py

.PHONY: int8-trunk fusion-check explain-eval help setup lint test test-fast bench bench-tail bench-logging bench-malloc bench-explain bench-precision bench-model train evaluate finder evaluate-finder promote-finder calibrate promote refit-gate evaluate-framings export compare archive serve stop restart token renew-token predict explain proto clean loadtest

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP)  ## build .venv from requirements.txt (torch from the local wheels)

$(STAMP): requirements.txt
	@scripts/check_java.sh || echo "warning: without Java 17+ TorchServe cannot start (training still works)" >&2
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .

test: $(STAMP) $(PROTO_STAMP) lint  ## lint, then the whole test suite (slow tests included; what CI runs)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)  ## the suite without slow tests and without starting TorchServe
	$(PY) -m pytest -q -m "not slow and not server"

bench-model: $(STAMP)  ## parameters, GFLOPs and CPU images/s of every registered model
	$(PY) -m train.bench_model

train: $(STAMP)  ## train OA-MEN on DATA (official protocol) into RUN, with the shipped recipe
	$(PY) -m train.fit --recipe $(RECIPE) --model $(MODEL) --data $(DATA) --out $(RUN) $(TRAIN_ARGS)

evaluate: $(STAMP)  ## evaluate the committed weights on DATA's val split (+ framing table, knee gate) -> reports/eval-val
	$(PY) -m train.evaluate --checkpoint $(WEIGHTS) --data $(DATA) --split val --out reports/eval-val \
		--framing $(if $(wildcard $(NONKNEE)),--nonknee $(NONKNEE))

# `make finder` trains a first finder (v1.0.0's recipe: the parser's defaults); the shipped one is a chain of
# fine-tunes whose last step is FINDER_ARGS="--recipe train/recipes/finder.py"
finder: $(STAMP)  ## train the knee-joint finder on the annotated leg films (FILMS) -> runs/finder/finder.pt (~10 min)
	$(PY) -m train.fit_finder --films $(FILMS) --koa $(DATA) --out runs/finder $(FINDER_ARGS)

# the shipped finder's threshold is chosen on the tune films, then everything is measured once on the test films
evaluate-finder: $(STAMP)  ## resolution floor, finder threshold, then the test films -> docs/model/finder.json, docs/FILMS.md (~25 min)
	$(PY) -m train.resolution --weights $(WEIGHTS) --data $(DATA) --out docs/model/resolution.json
	$(PY) -m train.eval_finder --finder $(FINDER) --choose --films $(FILMS) --koa $(DATA) \
		--min-joint-px $$($(PY) -m ops.results docs/model/resolution.json floor_px) \
		--weights $(WEIGHTS) $(if $(wildcard $(NONKNEE)),--nonknee $(NONKNEE)) --sheet docs/model/finder_test_films.jpg \
		--out docs/model/finder.json
	$(PY) -m ops.render_docs --only docs/FILMS.md

promote-finder: $(STAMP)  ## runs/finder/finder.pt becomes the shipped finder, measured and documented (evaluate-finder)
	cp runs/finder/finder.pt $(FINDER)
	$(MAKE) evaluate-finder

calibrate: $(STAMP)  ## fit temperature, decoding, knee gate and uncertain flag of RUN's best checkpoint -> RUN/calibrated.ckpt
	$(PY) -m train.calibrate --run $(RUN) --out $(RUN)/calibrated.ckpt

# promote: the run's calibrated checkpoint becomes the shipped weights, measured and documented.
# VERSION is the version the shipped weights will carry: a new one for new weights or a new calibration.
promote: $(STAMP)  ## calibrate RUN as VERSION=x.y.z, copy it to weights/, evaluate it into docs/model/ and regenerate the model card
	$(if $(VERSION),,$(error make promote needs VERSION=x.y.z, newer than the shipped model's (docs/MODEL_CARD.md)))
	$(PY) -m train.calibrate --run $(RUN) --out $(RUN)/calibrated.ckpt --version $(VERSION)
	cp $(RUN)/calibrated.ckpt $(WEIGHTS)
	cp $(RUN)/calibration.json docs/model/calibration.json
	cp $(RUN)/history.json $(RUN)/curves.png docs/model/
	$(PY) -m train.evaluate --checkpoint $(WEIGHTS) --data $(DATA) --split val --out docs/model/eval-val \
		--framing --nonknee $(NONKNEE)
	$(PY) -m ops.render_docs --only docs/MODEL_CARD.md

# refit-gate: the shipped grader's knee gate refitted on knees framed as other sites frame them (train.framings),
# measured and documented; the weights, calibration and decoding stay. VERSION as for promote.
refit-gate: $(STAMP)  ## refit the shipped knee gate on other sites' framings as VERSION=x.y.z, evaluate, regenerate docs
	$(if $(VERSION),,$(error make refit-gate needs VERSION=x.y.z, newer than the shipped model's (docs/MODEL_CARD.md)))
	$(PY) -m train.refit_gate --checkpoint $(WEIGHTS) --data $(DATA) --out runs/gate/oamen.ckpt --version $(VERSION)
	cp runs/gate/oamen.ckpt $(WEIGHTS)
	cp runs/gate/gate.json docs/model/gate_refit.json
	$(PY) -m train.evaluate --checkpoint $(WEIGHTS) --data $(DATA) --split val --out docs/model/eval-val \
		--framing --nonknee $(NONKNEE)
	$(PY) -m ops.render_docs --only docs/MODEL_CARD.md

# the served path (finder, knee gate, grader) on knees framed as other sites frame them, and on SITE_DATA's
# labelled knees (checked only): kept under LABEL beside earlier runs, rendered into docs/FILMS.md
SITE_DATA ?= ../shared/data/site2
evaluate-framings: $(STAMP)  ## refusals and grades of framed val knees, SITE_DATA and non-knee films, as served -> docs/FILMS.md
	$(PY) -m train.eval_framings --label "$(or $(LABEL),finder and grader as shipped)" --koa $(DATA) --site $(SITE_DATA) \
		--nonknee $(NONKNEE) --out docs/model/framings_served.json
	$(PY) -m ops.render_docs --only docs/FILMS.md

export: $(EXPORT)  ## TorchScript export of the committed weights

# The export is traced from the model code too: a change to model/ (a new buffer, a new method)
# must re-export, or the archive would ship a TorchScript file the handler no longer fits.
$(EXPORT): $(WEIGHTS) $(shell find model -name '*.py' 2>/dev/null) | $(STAMP)
	$(PY) -m train.export --checkpoint $(WEIGHTS) --out $@ --images tests/fixtures/knee_kl2.png

archive: $(ARCHIVE)  ## build model_store/oamen.mar (export first when the weights are newer)

$(ARCHIVE): $(EXPORT) $(FINDER) $(MARKERS) $(DRIFT_REF) $(INT8_TABLE) $(SOURCES) | $(STAMP)
	rm -rf build/mar && mkdir -p build/mar model_store
	cp -r model handler build/mar/
	cp $(FINDER) build/mar/finder.pt  # the knee-joint finder: whole films are answered per knee
	cp $(MARKERS) build/mar/markers.pt  # the burned-in R/L marker reader: a knee's laterality without a DICOM header
	cp $(DRIFT_REF) build/mar/drift_reference.json  # what val looked like to the model: the server's drift scores
	cp $(INT8_TABLE) build/mar/int8_trunk.json  # the ResNet trunk's int8 ranges: used where bfloat16 is not native
	find build/mar -name __pycache__ -prune -exec rm -rf {} +
	# the worker needs OA-MEN only: the lazily registered baselines stay out of the archive
	$(PY) -m ops.archive build/mar
	$(VENV)/bin/torch-model-archiver --model-name oamen --version 1.0 --serialized-file $(EXPORT) \
		--handler handler/koa_handler.py --extra-files build/mar --export-path model_store --force
	@echo "built $@"

serve: archive  ## start TorchServe in the background; returns when the model answers (SITE=name[,name] adds site profiles; TLS=1: behind the secure door)
	$(if $(SITE),KOA_SITE_PROFILES="$$($(PY) -m ops.sites check $(SITE) --weights $(WEIGHTS))" || exit 1; export KOA_SITE_PROFILES;) \
	$(if $(filter 1 yes true,$(TLS)),$(DOOR) start --replicas 1,$(PY) -m ops.server start --workdir $(SERVE_DIR))

stop: $(STAMP)  ## stop TorchServe and wait until its processes are gone (TLS=1: the door and its replicas)
	$(if $(filter 1 yes true,$(TLS)),$(DOOR) stop,$(PY) -m ops.server stop --workdir $(SERVE_DIR))

restart: archive  ## stop, then start again (new keys: clients re-read key_file.json; see docs/RELIABILITY.md)
	$(PY) -m ops.server restart --workdir $(SERVE_DIR)

token: $(STAMP)  ## print the inference key of the running server
	@$(PY) -m ops.server token --workdir $(SERVE_DIR)

renew-token: $(STAMP)  ## replace the inference key of the running server (keys expire after 60 min)
	@$(PY) -m ops.server renew --workdir $(SERVE_DIR)

proto: $(STAMP)  ## regenerate the committed gRPC stubs (koa_client/_proto) from the proto inside TorchServe's jar
	$(PY) -m koa_client.gen_proto

$(PROTO_STAMP): | $(STAMP)
	$(PY) -m koa_client.gen_proto

predict: $(PROTO_STAMP)  ## grade IMAGE=... on the running server (REST)
	$(PY) -m koa_client predict $(IMAGE) --key-file $(SERVE_DIR)/key_file.json

explain: $(PROTO_STAMP)  ## grade and explain IMAGE=... (writes the overlay PNG to reports/explain/; METHOD=... picks the method)
	$(PY) -m koa_client predict $(IMAGE) --explain --key-file $(SERVE_DIR)/key_file.json --overlay-dir reports/explain $(if $(METHOD),--method $(METHOD))

bench: archive  ## served against in-process, batching sweep, JIT warm-up, REST against gRPC in paired rounds -> docs/results/bench_sweep.json, docs/BENCHMARKS.md (~20 min)
	$(PY) -m ops.bench sweep

bench-tail: archive $(PROTO_STAMP)  ## Locust at 80% of saturation, shipped batching (or SETTINGS=16x10,8x10) -> docs/results/bench_tail.json (~7 min each)
	$(PY) -m ops.bench tail $(if $(SETTINGS),--settings $(SETTINGS)) $(if $(REPEAT),--repeat $(REPEAT))

bench-logging: archive  ## TorchServe's built-in log setting against log4j2.xml, side by side -> docs/results/bench_logging.json (~3 min)
	$(PY) -m ops.bench logging --json docs/results/bench_logging.json

bench-malloc: archive  ## the worker's malloc settings against glibc's defaults, fresh processes side by side -> docs/results/bench_malloc.json (~3 min)
	$(PY) -m ops.bench malloc

bench-precision: archive  ## float32 against bfloat16: speed of the grader and finder, val answers, finder decisions -> docs/results/bench_precision.json (~6 min)
	$(PY) -m ops.bench precision --json docs/results/bench_precision.json

explain-eval: $(STAMP)  ## measure the explanation methods on val knees -> docs/results/explain_eval.json, explain_time.json, docs/EXPLAIN.md
	$(PY) -m ops.explain_eval --data $(DATA)
	$(PY) -m ops.explain_eval --data $(DATA) --time-only --knees 5 --rounds 2 --methods layercam gradcam ig_blur smoothgrad ig \
		--json reports/explain_time.json --copy docs/results/explain_time.json
	$(PY) -m ops.render_docs

bench-explain: archive  ## plain-prediction latency with 10% IG explanations, batch answered at once vs. early answers, side by side -> reports/ and docs/results/bench_explain.json (~7 min)
	$(PY) -m ops.bench explain $(if $(THREADS),--threads $(THREADS))

compare: $(STAMP)  ## OA-MEN against the paper's baselines (quick budget; see train/compare.py)
	$(PY) -m train.compare --data $(DATA) --out reports/compare --quick

clean:  ## remove build outputs (keeps .venv)
	rm -rf build model_store reports logs koa_client/_proto .pytest_cache .ruff_cache

# The PACS side (docs/PACS.md): Orthanc (DICOM ORTHANC@127.0.0.1:4242, REST on 127.0.0.1:8042 with basic auth)
# and the DICOM gateway (KOASERVE@127.0.0.1:11112) beside the TorchServe of `make serve`, which is started when
# it is not running. Their data (storage, spool, audit.jsonl, logs) stays in pacs/data/.
.PHONY: pacs pacs-stop pacs-credentials pacs-demo
pacs: archive  ## Orthanc + the DICOM gateway beside make serve's TorchServe (started if needed); returns when they answer (TLS=1: DICOM TLS, grading through the door)
ifneq ($(filter 1 yes true,$(TLS)),)
	@$(DOOR) status >/dev/null || $(DOOR) start --replicas 1
	@test -f $(CERTS)/clients/koaserve-gateway.crt || $(DOOR) client-add koaserve-gateway
	$(PY) -m pacs start --tls --certs $(CERTS) --ts-url https://127.0.0.1:8443
else
	@$(PY) -m ops.server status --workdir $(SERVE_DIR) >/dev/null || $(PY) -m ops.server start --workdir $(SERVE_DIR)
	$(PY) -m pacs start --key-file $(SERVE_DIR)/key_file.json
endif

pacs-stop: $(STAMP)  ## stop the gateway and Orthanc; returns when both are gone (TorchServe keeps running)
	$(PY) -m pacs stop

pacs-credentials: $(STAMP)  ## print Orthanc's REST user:password (made at the first make pacs)
	@$(PY) -m pacs credentials

pacs-demo: $(STAMP)  ## send IMAGE=... to Orthanc as a DX study; print the SR the gateway stores back (TLS=1: over DICOM TLS)
	$(PY) -m pacs demo $(IMAGE) $(if $(filter 1 yes true,$(TLS)),--tls --certs $(CERTS))

# Load test (python -m loadtest.run): USERS, RATE, DURATION (per protocol), PROTOCOLS, EXPLAIN_SHARE, USER_RATE and
# IMAGES pass through when set (defaults in loadtest/run.py: 4 users, 2/s, 30s, rest,grpc); START=1 always
# starts a private server on free ports (one is also started when `make serve` is not running).
loadtest: archive $(PROTO_STAMP)  ## Locust, headless, REST then gRPC -> reports/loadtest/latest
	$(PY) -m loadtest.run --workdir $(SERVE_DIR) \
		$(if $(USERS),--users $(USERS)) $(if $(RATE),--rate $(RATE)) $(if $(DURATION),--duration $(DURATION)) \
		$(if $(PROTOCOLS),--protocols $(PROTOCOLS)) $(if $(EXPLAIN_SHARE),--explain-share $(EXPLAIN_SHARE)) $(if $(USER_RATE),--user-rate $(USER_RATE)) \
		$(if $(IMAGES),--images $(IMAGES)) $(if $(filter 1 yes true,$(START)),--start)

# Replicas on one machine behind HAProxy, one bearer token checked at the front (ops/cluster/,
# docs/DEPLOY.md): N replicas (default 2) on free loopback ports, the balancer on 127.0.0.1:8180 (REST)
# and 7170 (gRPC); the token is in logs/cluster/key_file.json (--key-file, KOA_KEY_FILE).
.PHONY: cluster cluster-stop drill-replicas
cluster: archive $(PROTO_STAMP)  ## N TorchServe replicas (N=2) behind HAProxy; returns when a request passes (SITE=name[,name] adds site profiles; TLS=1: the secure door)
	$(if $(SITE),KOA_SITE_PROFILES="$$($(PY) -m ops.sites check $(SITE) --weights $(WEIGHTS))" || exit 1; export KOA_SITE_PROFILES;) \
	$(if $(filter 1 yes true,$(TLS)),$(DOOR) start --replicas $(or $(N),2),$(PY) -m ops.cluster start --replicas $(or $(N),2))

cluster-stop: $(STAMP)  ## stop the cluster's HAProxy and replicas; returns when all are gone (TLS=1: the door)
	$(if $(filter 1 yes true,$(TLS)),$(DOOR) stop,$(PY) -m ops.cluster stop)

drill-replicas: archive $(PROTO_STAMP)  ## throughput with 1 and N replicas, then kill one under load -> reports/drills/replicas.json (~10 min)
	$(PY) -m ops.drills.replicas --replicas $(or $(N),2) --configs 1,1x1,$(or $(N),2) --rounds 2

# The secure front door (ops/door/, docs/SECURITY.md): `make serve TLS=1` / `make cluster N=2 TLS=1` put HAProxy
# with mutual TLS in front (REST https://127.0.0.1:8443, gRPC 127.0.0.1:7443), one client certificate per calling
# system, an audit trail in logs/door/audit.jsonl. The files are the operator's: DOOR_CERT (certificate + key, PEM),
# DOOR_CA (the CA of the client certificates), DOOR_CRL, DOOR_POLICY (who may call what); the defaults are the
# development ones `make certs` writes in certs/ (never for production).
CERTS ?= certs
DOOR_CERT ?= $(CERTS)/server.pem
DOOR_CA ?= $(CERTS)/ca.crt
DOOR_CRL ?= $(CERTS)/crl.pem
DOOR_POLICY ?= $(CERTS)/clients.json
DOOR_DIR ?= logs/door
DOOR = $(PY) -m ops.door --workdir $(DOOR_DIR) --certs $(CERTS) --cert $(DOOR_CERT) --ca $(DOOR_CA) --crl $(DOOR_CRL) --policy $(DOOR_POLICY)
.PHONY: certs client-add client-revoke audit-verify bench-door
certs: $(STAMP)  ## a development CA, the door's certificate for localhost/127.0.0.1 and a CRL in certs/ (dev/test only)
	$(PY) -m ops.pki init --dir $(CERTS)

client-add: $(STAMP)  ## NAME=<system>: its client certificate (certs/clients/) and its place in the door's policy (ENDPOINTS, PER_MINUTE)
	$(if $(NAME),,$(error make client-add needs NAME=<calling system>))
	$(DOOR) client-add $(NAME) $(if $(ENDPOINTS),--endpoints $(ENDPOINTS)) $(if $(PER_MINUTE),--per-minute $(PER_MINUTE))

client-revoke: $(STAMP)  ## NAME=<system>: revoke its certificate; a running door loads the new CRL without dropping others
	$(if $(NAME),,$(error make client-revoke needs NAME=<calling system>))
	$(DOOR) client-revoke $(NAME)

audit-verify: $(STAMP)  ## check the hash chain of the door's audit trail (logs/door/audit.jsonl)
	$(PY) -m ops.audit verify $(DOOR_DIR)/audit.jsonl

bench-door: archive  ## throughput at saturation, plain HTTP against the TLS door, side by side -> docs/results/bench_door.json (~4 min)
	$(PY) -m ops.bench door

# Site acceptance and calibration (docs/SITES.md): a hospital's own knees through the served path ->
# sites/SITE/report.md, report.json, figures and, when it beats the default, profile.json (make serve SITE=...).
.PHONY: site-check site-study
site-check: $(STAMP)  ## check SITE=name on DATA=<grade>/<image> folder or file,grade CSV (or plain images) -> sites/SITE/
	$(if $(and $(SITE),$(filter command line environment,$(origin DATA))),,$(error make site-check needs SITE=name and DATA=folder-or-csv))
	$(PY) -m train.site_check --site $(SITE) --data $(DATA) --weights $(WEIGHTS) --finder $(FINDER)

site-study: $(STAMP)  ## cross-fitted site calibration on SITE_DATA (50, 100, all knees, label-free) and val -> docs/results/site_calibration.json, sites/reference.json (~20 min)
	$(PY) -m train.site_study --site-data $(SITE_DATA) --val $(DATA) --weights $(WEIGHTS) --finder $(FINDER)
	$(PY) -m ops.render_docs

# Monitoring (docs/MONITORING.md): Debian's Prometheus on 127.0.0.1:9090 and Alertmanager on :9093 with
# deploy/monitoring/, scraping make serve (8082), make pacs's gateway (9464) and make cluster's HAProxy (8190);
# alerts go to the project's webhook (127.0.0.1:9095), which logs them to logs/monitor/alerts.jsonl.
.PHONY: monitor monitor-stop drift-reference drill-drift bench-metrics
monitor: $(STAMP)  ## start Prometheus and Alertmanager on 127.0.0.1:9090/9093 (alerts -> logs/monitor/alerts.jsonl)
	$(PY) -m ops.monitor start

monitor-stop: $(STAMP)  ## stop Prometheus, Alertmanager and the alert webhook
	$(PY) -m ops.monitor stop

int8-trunk: $(EXPORT)  ## measure the grader trunk's int8 ranges on training knees, check every answer as served -> weights/oamen.int8.json, docs/results/int8_trunk.json (~6 min)
	$(PY) -m ops.int8_trunk

fusion-check: $(EXPORT)  ## check every answer with oneDNN Graph fusion as served, time it side by side -> docs/results/onednn_fusion.json (~8 min)
	$(PY) -m ops.fusion_check

drift-reference: $(EXPORT)  ## measure the drift reference on val, choose window and threshold -> weights/oamen.drift.json, docs/results/drift_choice.json (~20 min)
	$(PY) -m ops.drift_reference --data $(DATA) $(if $(SITE2),--site2 $(SITE2))

drill-drift: archive  ## val knees then site2 knees through the server with Prometheus watching -> reports/drills/drift.json (~10 min)
	$(PY) -m ops.drills.drift --data $(DATA) $(if $(SITE2),--site2 $(SITE2)) --screenshot reports/drills/drift.png

bench-metrics: $(EXPORT)  ## the request path with and without the grader's metrics, alternating rounds -> docs/results/bench_metrics.json (~5 min)
	$(PY) -m ops.bench metrics

# The generated pages and blocks of docs/ (ops/render_docs.py, one registry): `make docs-check` is what tests/test_docs.py checks.
.PHONY: render-docs docs-check
render-docs: $(STAMP)  ## render every generated page and block of docs/ from the committed results, weights and code
	$(PY) -m ops.render_docs

docs-check: $(STAMP)  ## fail naming each generated page that differs from what its committed files give
	$(PY) -m ops.render_docs --check
