"""Site profiles: written, verified and refused (`model.profile`), picked per request in the handler
(`handler.sites`, `handler.service.Predictor`) without a server, and the site calibration's fitting
(`train.site_fit`) and sample reading (`train.site_sample`) on small hand-made cases."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from handler.service import Predictor
from handler.sites import ENV, Profiles
from model import create_model
from model.checkpoint import load_torchscript
from model.contract import InputContract, PostprocessConfig
from model.profile import ProfileError, SiteProfile, load_profile
from tests.conftest import TINY_CONTRACT_ARGS
from train import site_fit
from train.metrics import expected_calibration_error
from train.site_sample import SampleError, read_sample

CONTRACT = InputContract(**TINY_CONTRACT_ARGS)


def profile(name: str = "north", contract: InputContract = CONTRACT, **post) -> SiteProfile:
    return SiteProfile(
        name=name, version="1", model_name=contract.model_name, model_version=contract.model_version,
        postprocess=post or {"decision": "cutpoints", "cutpoints": [0.5, 1.5, 2.5, 3.5], "temperature": 2.0},
    )  # fmt: skip


# --- the profile file ------------------------------------------------------------------------------------


def test_profile_round_trip_and_checksum(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(profile().to_json())
    loaded = load_profile(path, CONTRACT)
    assert loaded == profile()
    assert loaded.applied(CONTRACT).temperature == 2.0
    assert loaded.applied(CONTRACT).gate == CONTRACT.postprocess.gate  # what is not fitted stays the model's


def test_a_tampered_profile_is_refused(tmp_path: Path) -> None:
    data = json.loads(profile().to_json())
    data["postprocess"]["temperature"] = 0.5  # edited by hand: the checksum no longer matches
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="checksum does not match"):
        load_profile(path)


def test_a_profile_for_other_weights_is_refused(tmp_path: Path) -> None:
    other = CONTRACT.replace(model_version="0.0.1-other")
    path = tmp_path / "profile.json"
    path.write_text(profile(contract=other).to_json())
    with pytest.raises(ProfileError, match="was fitted for .* re-run the site check"):
        load_profile(path, CONTRACT)


@pytest.mark.parametrize(
    "post, match",
    [
        ({"gate_threshold": 1.0}, "may refit only"),
        ({"decision": "cutpoints", "cutpoints": [2.0, 1.0, 3, 4]}, "increase"),
    ],
)
def test_a_profile_may_change_only_the_calibration(tmp_path: Path, post, match) -> None:
    with pytest.raises(ProfileError, match=match):
        load_profile(_write(tmp_path, profile(**post) if "gate_threshold" not in post else None, post), CONTRACT)


def _write(tmp_path: Path, p: SiteProfile | None, post: dict) -> Path:
    if p is None:  # SiteProfile refuses it: write what a hand-made file would hold, with a valid checksum
        from model.profile import checksum

        data = {**json.loads(profile().to_json()), "postprocess": post}
        data["checksum"] = checksum(data)
        text = json.dumps(data)
    else:
        text = p.to_json()
    path = tmp_path / "profile.json"
    path.write_text(text)
    return path


def test_env_names_files_and_folders(tmp_path: Path) -> None:
    for name in ("north", "south"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "profile.json").write_text(profile(name).to_json())
    profiles = Profiles.from_env(CONTRACT, {ENV: str(tmp_path)})
    assert sorted(profiles.by_name) == ["north", "south"]
    with pytest.raises(ProfileError, match="does not exist"):
        Profiles.from_env(CONTRACT, {ENV: str(tmp_path / "missing")})
    (tmp_path / "south" / "profile.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profiles.from_env(CONTRACT, {ENV: str(tmp_path)})


# --- per request, in the handler ---------------------------------------------------------------------------


def png(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (80, 120), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.fixture(scope="module")
def site_predictor(exported) -> Predictor:
    scripted, contract = load_torchscript(exported)
    eager = create_model(contract.model_name)
    eager.load_state_dict(scripted.state_dict())
    # a profile whose decoding always says KL4: the cut-points sit below any expected grade
    p = profile("north", contract, decision="cutpoints", cutpoints=[-4.0, -3.0, -2.0, -1.0])
    return Predictor(scripted, eager.eval(), contract, torch.device("cpu"), profiles=Profiles(contract, [p]))


def test_a_header_picks_the_profile_and_the_answer_names_it(site_predictor: Predictor) -> None:
    rows = [{"body": png(1)}, {"body": png(1)}, {"body": png(1)}, {"body": png(1), "site": b"North"}]
    headers = [{}, {"X-KOA-Site": "north"}, {"x-koa-site": "elsewhere"}, {}]
    answers = site_predictor.handle(rows, headers)
    assert [status for status, _ in answers] == [200] * 4
    default, north, unknown, by_field = (body for _, body in answers)
    assert default["model"]["profile"] == {"name": "default"}
    assert north["model"]["profile"] == {"name": "north", "version": "1"} == by_field["model"]["profile"]
    assert north["kl_grade"] == 4 == by_field["kl_grade"]
    assert north["probabilities"] == default["probabilities"]  # same temperature: only the decoding moved
    assert unknown["model"]["profile"]["name"] == "default" and unknown["model"]["profile"]["requested"] == "elsewhere"
    assert unknown["kl_grade"] == default["kl_grade"]


def test_a_profile_that_reads_at_the_joint_grades_the_cut(exported, monkeypatch, tmp_path: Path) -> None:
    """A profile with ``reading: joint`` grades a crop cut around its joint (`model.localize.crop_view`): the same
    answer as the cut sent as an image of its own; other sites still get the crop graded whole."""
    from model.localize import FinderConfig, Joint, crop_joint

    scripted, contract = load_torchscript(exported)
    eager = create_model(contract.model_name)
    eager.load_state_dict(scripted.state_dict())
    same = {"temperature": contract.postprocess.temperature}  # the shipped calibration: only the reading differs
    p = SiteProfile(name="band", version="1", model_name=contract.model_name, model_version=contract.model_version,
                    postprocess=same, reading="joint")  # fmt: skip
    (tmp_path / "profile.json").write_text(p.to_json())
    p = load_profile(tmp_path / "profile.json", contract)  # the reading survives the file
    pred = Predictor(scripted, eager.eval(), contract, torch.device("cpu"), profiles=Profiles(contract, [p]))
    pred.finder = (None, FinderConfig(min_joint_px=40))

    def seen(net, cfg, grays, device):  # a joint spanning most of any image: each is a crop already
        return [[Joint((0.2 * g.shape[1], 10.0, 0.8 * g.shape[1], 10.0 + 0.6 * g.shape[1]), "ap", 0.9)] for g in grays]

    monkeypatch.setattr("handler.service.find_joints", seen)
    gray = np.random.default_rng(4).integers(0, 255, (80, 120), dtype=np.uint8)
    gray[:, :20] = 255  # a bright edge the cut leaves out
    band = cv2.imencode(".png", gray)[1].tobytes()
    cut = crop_joint(gray, seen(None, None, [gray], None)[0][0])
    rows = [{"body": band}, {"body": band}, {"body": cv2.imencode(".png", cut)[1].tobytes()}]
    (s1, whole), (s2, at_joint), (s3, alone) = pred.handle(rows, [{}, {"X-KOA-Site": "band"}, {}])
    assert s1 == s2 == s3 == 200
    assert at_joint["model"]["profile"] == {"name": "band", "version": "1", "reading": "joint"}
    assert whole["model"]["profile"] == {"name": "default"}
    assert max(abs(a - b) for a, b in zip(at_joint["probabilities"], whole["probabilities"], strict=True)) > 1e-3
    assert at_joint["probabilities"] == pytest.approx(alone["probabilities"], abs=2e-4)  # batches differ a little


def test_a_profile_names_a_known_reading_and_an_old_one_reads_whole(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="reading must be one of"):
        SiteProfile(name="north", version="1", model_name="m", model_version="1", postprocess={}, reading="zoomed")
    from model.profile import checksum

    data = {k: v for k, v in json.loads(profile().to_json()).items() if k not in ("checksum", "reading")}
    data["checksum"] = checksum(data)  # a profile written before the field
    (tmp_path / "profile.json").write_text(json.dumps(data))
    assert load_profile(tmp_path / "profile.json", CONTRACT).reading == "whole"


def test_profile_for_other_weights_stops_the_predictor(exported) -> None:
    _, contract = load_torchscript(exported)
    with pytest.raises(ProfileError, match="was fitted for"):
        Profiles(contract, [profile("north", contract.replace(model_version="7.7.7"))])


# --- fitting ----------------------------------------------------------------------------------------------


def _shifted(n: int = 300, shift: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that grades one step too high, as site2's knees show."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    centre = np.clip(y + shift, 0, 4) + rng.normal(0, 0.6, n)
    logits = -((np.arange(5)[None] - centre[:, None]) ** 2)
    return logits[:, None, :], y


def test_cutpoints_undo_a_shift_and_are_chosen_held_out() -> None:
    logits, y = _shifted()
    base = PostprocessConfig(decision="cutpoints", cutpoints=(0.5, 1.5, 2.5, 3.5))
    cv = site_fit.cross_fit(logits, y, base, ["shipped", "cutpoints"], repeats=2)
    assert cv["cutpoints"]["accuracy"] > cv["shipped"]["accuracy"] + 0.15
    assert site_fit.choose(cv) == "cutpoints"


def test_the_probes_read_a_shift_the_way_a_profile_would() -> None:
    """train.probe_figures (the site probes): the weights alone show the shift; cut-points refitted on part of the
    knees undo it on the others."""
    from train.probe_figures import profile_draws, raw_figures

    logits, y = _shifted()
    figs, p = raw_figures(logits, y)
    assert figs["knees"] == len(y) and figs["mean_grade_minus_label"] > 0.5 and figs["spearman_expected_grade"] > 0.8
    refit = profile_draws(p, y, knees=100, draws=5, seed=0)
    assert refit["accuracy"] > figs["accuracy"] + 0.1 and refit["qwk"] >= figs["qwk"]


def test_the_reframe_probe_cuts_a_centred_window() -> None:
    from train.site_reframe_probe import READINGS

    band = np.zeros((100, 300), np.float32)
    band[:, 100:200] = 1.0  # the middle third of the band lit
    assert READINGS["whole"][1](band).shape == (100, 300)
    square = READINGS["square_1.0"][1](band)
    assert square.shape == (100, 100) and square.min() == 1.0  # exactly the lit middle
    assert READINGS["zoom_0.8"][1](band).shape == (80, 240)


def test_a_reading_that_undoes_a_shift_is_a_candidate_of_its_own() -> None:
    """Readings are cross-fitted on the same folds as candidates ``<reading>/<method>``; the gain is over the
    shipped decoding of the whole reading, and the choice names the reading (`site_fit.parse`)."""
    shifted, y = _shifted(shift=1.0)
    sharper, _ = _shifted(shift=0.0)  # the same knees read at the joint: no shift
    base = PostprocessConfig(decision="cutpoints", cutpoints=(0.5, 1.5, 2.5, 3.5))
    cv = site_fit.cross_fit({"whole": shifted, "joint": sharper}, y, base, ["shipped", "cutpoints"], repeats=2)
    assert sorted(cv) == ["cutpoints", "joint/cutpoints", "joint/shipped", "shipped"]
    assert cv["joint/shipped"]["gain_low"] > 0.1 and cv["shipped"]["gain_low"] == 0.0
    reading, method = site_fit.parse(site_fit.choose(cv))
    assert reading == "joint" and method.name in ("shipped", "cutpoints")
    assert site_fit.parse("cutpoints") == ("whole", site_fit.METHODS["cutpoints"])
    assert "read at the joint" in site_fit.describe("joint/cutpoints")
    single = site_fit.cross_fit(shifted, y, base, ["shipped", "cutpoints"], repeats=2)
    assert single == {k: v for k, v in cv.items() if "/" not in k}  # one reading: the figures as before


def test_held_out_figures_carry_the_librarys_ece() -> None:
    logits, y = _shifted()
    figs = site_fit.cross_fit(logits, y, PostprocessConfig(), ["shipped"], repeats=1)["shipped"]
    probs = site_fit.probabilities(logits, PostprocessConfig())
    assert figs["ece"] == pytest.approx(expected_calibration_error(y, probs))  # the library's ECE, unchecked


def test_no_shift_keeps_the_default() -> None:
    logits, y = _shifted(shift=0.0)
    base = PostprocessConfig(decision="cutpoints", cutpoints=(0.5, 1.5, 2.5, 3.5))
    cv = site_fit.cross_fit(logits, y, base, ["shipped", "cutpoints"], repeats=3)
    assert site_fit.choose(cv) == "shipped"


def test_em_prior_recovers_a_grade_mix() -> None:
    rng = np.random.default_rng(0)
    train = np.full(5, 0.2)
    y = rng.choice(5, 2000, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    logits = np.eye(5)[y] * 2.0 + rng.normal(0, 1.0, (2000, 5))
    bias = np.array(site_fit.em_prior_bias(logits[:, None], PostprocessConfig(), train))
    assert bias.argmax() == 0 and bias[0] - bias[2:].mean() > 0.5


# --- the sample --------------------------------------------------------------------------------------------


def test_bad_samples_are_reported_by_name(tmp_path: Path) -> None:
    with pytest.raises(SampleError, match="no grade folders"):
        read_sample(tmp_path)
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "a.png").write_bytes(png(0))
    (tmp_path / "7").mkdir()
    s = read_sample(tmp_path)
    assert s.grades == [0] and any("'7'" in w or "7" in w for w in s.warnings)
    assert any("no knees of grade 1, 2, 3, 4" in w for w in s.warnings)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,grade\n0/a.png,0\nmissing.png,1\n0/a.png,9\n")
    s = read_sample(csv)
    assert s.grades == [0]
    assert any("missing.png" in w for w in s.warnings) and any("'9'" in w for w in s.warnings)


# --- the DICOM gateway's mapping ------------------------------------------------------------------------------


def test_gateway_maps_sender_and_institution_to_a_site(tmp_path: Path) -> None:
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from gateway.service import Gateway, GatewayConfig

    def dicom(institution: str, sender: str) -> bytes:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.SourceApplicationEntityTitle = sender
        ds.InstitutionName = institution
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    gw = Gateway(GatewayConfig(spool=tmp_path / "spool", sites={"NORTHPACS": "north", "South General": "south"}))
    assert gw.site_of(dicom("Elsewhere", "NORTHPACS")) == "north"
    assert gw.site_of(dicom("south general", "OTHER")) == "south"
    assert gw.site_of(dicom("Elsewhere", "OTHER")) is None
    assert gw.site_of(b"not dicom") is None


# --- the site check end to end, on the shipped weights ------------------------------------------------------


@pytest.mark.slow
def test_site_check_reports_bad_input_and_writes_whole_or_nothing(tmp_path: Path, knee_png: bytes) -> None:
    from train import site_check

    data = tmp_path / "data"
    for g in (0, 2):
        (data / str(g)).mkdir(parents=True)
        (data / str(g) / "knee.png").write_bytes(knee_png)
    (data / "2" / "broken.png").write_bytes(b"\x89PNG not really")
    (data / "3").mkdir()
    out = tmp_path / "sites"
    args = site_check.get_args_parser().parse_args(
        ["--site", "trial", "--data", str(data), "--out", str(out), "--no-progress", "--thresholds", "none"]
    )
    assert site_check.main(args) == 0
    report = json.loads((out / "trial" / "report.json").read_text())
    outcomes = {Path(k["file"]).as_posix(): k["outcome"] for k in report["per_knee"]}
    assert outcomes["2/broken.png"] == "invalid_image"
    assert any("grade 1, 3, 4" in w for w in report["sample"]["warnings"])
    assert report["decision"]["decision"] in ("no-go", "cannot tell")  # 3 knees decide nothing
    assert not (out / "trial" / "profile.json").exists()  # too few knees to fit a calibration on
    assert "Decision" in (out / "trial" / "report.md").read_text()
    plain = tmp_path / "plain"  # no grades: what can be known, and that accuracy cannot
    plain.mkdir()
    (plain / "knee.png").write_bytes(knee_png)
    args.site, args.data = "unlabelled", str(plain)
    assert site_check.main(args) == 0
    text = (out / "unlabelled" / "report.md").read_text()
    assert "Accuracy cannot be known" in text and "cannot tell" in text
    before = sorted(p.name for p in out.iterdir())
    bad = site_check.get_args_parser().parse_args(
        ["--site", "other", "--data", str(tmp_path / "none"), "--out", str(out)]
    )
    assert site_check.main(bad) == 2  # a clear error, and nothing written
    args.site, args.readings = "zoomed", "whole,zoomed"  # an unknown reading: refused before any knee is run
    assert site_check.main(args) == 2
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_bootstraps_fast_figures_are_the_library_ones() -> None:
    from train.metrics import expected_calibration_error, quadratic_weighted_kappa, roc_auc_ovr
    from train.site_report import auc_ovr, ece

    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 120)
    p = rng.dirichlet(np.ones(5), 120).round(2)  # rounded: ties, which count one half
    p = p / p.sum(1, keepdims=True)
    g = p.argmax(1)
    assert np.allclose(auc_ovr(y, p), roc_auc_ovr(y, p))
    assert ece(y, p) == pytest.approx(expected_calibration_error(y, p))
    assert site_fit.qwk(y, g, 5) == pytest.approx(quadratic_weighted_kappa(y, g, 5))


# --- the TorchServe entry point: profiles load at start, a bad one stops the worker ---------------------------


def test_the_worker_loads_profiles_at_start_and_refuses_a_bad_one(exported, tmp_path: Path, monkeypatch) -> None:
    import shutil

    from ts.context import Context, RequestProcessor

    from handler.drain import STATE_ENV
    from handler.koa_handler import KOAHandler

    monkeypatch.delenv(STATE_ENV, raising=False)
    _, contract = load_torchscript(exported)
    shutil.copy(exported, tmp_path / "oamen.pt")
    manifest = {"model": {"modelName": "oamen", "serializedFile": "oamen.pt", "handler": "koa_handler.py"}}
    good = tmp_path / "north.json"
    good.write_text(profile("north", contract).to_json())
    monkeypatch.setenv(ENV, str(good))
    ctx = Context("oamen", str(tmp_path), manifest, 1, None, "0.12.0")
    handler = KOAHandler()
    handler.initialize(ctx)
    ctx.request_processor = [RequestProcessor({"x-koa-site": "north"})]
    (out,) = handler.handle([{"body": png(4)}], ctx)
    assert json.loads(out)["model"]["profile"] == {"name": "north", "version": "1"}
    stale = tmp_path / "stale.json"
    stale.write_text(profile("south", contract.replace(model_version="0.0.0-old")).to_json())
    monkeypatch.setenv(ENV, f"{good}:{stale}")
    with pytest.raises(ProfileError, match="south.*re-run the site check"):
        KOAHandler().initialize(Context("oamen", str(tmp_path), manifest, 1, None, "0.12.0"))
