"""The config tree: conventions over every field, overrides, presets, cache sections, the optimisation deadline."""

import dataclasses
import json

import pytest
import torch

from harmonize_core.config import (
    DEFAULT_TAU,
    OVERRIDE_FIELDS,
    PRESETS,
    STAGE_SECTIONS,
    HarmonizeConfig,
    apply_overrides,
    canonical_section,
    config_digest,
    override_targets,
    preset,
    stage_section,
)
from harmonize_core.errors import StageTimeoutError
from harmonize_core.network.vgg import load_backbone
from harmonize_core.optimisation.lbfgs import LbfgsSettings, optimise
from harmonize_core.optimisation.objective import Problem, Term
from manifests import RunSettings
from manifests.schema import resolve_config
from tasks import caching


def _all_fields():
    config = HarmonizeConfig()
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                yield f"{section.name}.{field.name}", field
        else:
            yield section.name, section


@pytest.mark.parametrize(("name", "field"), list(_all_fields()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_field_has_a_default_and_a_help_text(name, field):
    assert field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING, name
    assert field.metadata.get("help"), f"{name} has no help text citing its source"


def test_overrides_name_real_fields_and_presets_apply(monkeypatch, tmp_path):
    monkeypatch.delenv("HARMONIZE_CAFFE_VGG19", raising=False)
    monkeypatch.setenv("HARMONIZE_CACHE_DIR", str(tmp_path))
    for flat in OVERRIDE_FIELDS:
        for dotted in override_targets(flat):
            section, name = dotted.split(".")
            assert name in {f.name for f in dataclasses.fields(getattr(HarmonizeConfig(), section))}, flat
    deadline = apply_overrides(HarmonizeConfig(), {"max_seconds": "90"})  # one flag bounds both passes
    assert (deadline.pass1.max_seconds, deadline.pass2.max_seconds) == (90.0, 90.0)
    paper = preset("paper")
    assert paper == HarmonizeConfig() and (paper.sizing.size, paper.pass1.iterations, paper.pass2.iterations) == (
        700, 1000, 1000)
    assert (paper.backbone.name, paper.backbone.weights) == ("vgg16", "offline-vgg16")  # no Caffe VGG19 configured
    quick = preset("quick")
    assert (quick.sizing.size, quick.backbone.name, quick.backbone.weights) == (256, "vgg16", "offline-vgg16")
    assert set(PRESETS) == {"paper", "fast", "quick"}
    tuned = apply_overrides(quick, {"tau": "auto", "size": "128", "pass1_iters": 7, "pass2_iters": None})
    assert (tuned.pass2.tau, tuned.sizing.size, tuned.pass1.iterations) == ("auto", 128, 7)
    assert tuned.pass2.iterations == quick.pass2.iterations  # None leaves the value alone
    for bad in ({"tau": "-1"}, {"size": 8}, {"backbone": "resnet"}, {"nope": 1}):
        with pytest.raises(ValueError):
            apply_overrides(quick, bad)


def test_the_paper_preset_takes_a_configured_caffe_vgg19_and_weights_pick_their_network(monkeypatch, tmp_path):
    from harmonize_core.network.weights import CAFFE_VGG19_FILE, describe_network

    monkeypatch.delenv("HARMONIZE_CAFFE_VGG19", raising=False)
    monkeypatch.setenv("HARMONIZE_CACHE_DIR", str(tmp_path))
    (tmp_path / CAFFE_VGG19_FILE).write_bytes(b"a state dict")  # the configured default location
    paper = preset("paper").backbone
    assert (paper.name, paper.weights) == ("vgg19", f"{tmp_path / CAFFE_VGG19_FILE}#caffe")
    monkeypatch.setenv("HARMONIZE_CAFFE_VGG19", "s3://models/vgg19.pth")
    assert preset("paper").backbone.weights == "s3://models/vgg19.pth#caffe"
    assert preset("quick").backbone.name == "vgg16"  # the small preset keeps the offline network
    # --weights without --backbone: the source says which network it is
    assert apply_overrides(preset("quick"), {"weights": "imagenet"}).backbone.name == "vgg19"
    assert apply_overrides(preset("quick"), {"weights": "/w/vgg.pth#caffe"}).backbone.name == "vgg19"
    assert apply_overrides(preset("paper"), {"weights": "offline-vgg16"}).backbone.name == "vgg16"
    assert apply_overrides(preset("paper"), {"weights": "random:0"}).backbone.name == "vgg19"  # kept
    assert apply_overrides(preset("quick"), {"weights": "/w/v.pth", "backbone": "vgg16"}).backbone.name == "vgg16"
    assert "pass 1's Caffe-tuned loss weights" in describe_network("vgg19", "imagenet")
    assert "offline ImageNet weights" in describe_network("vgg16", "offline-vgg16")


def test_the_core_estimates_cpu_time_from_pixels_and_iterations():
    from harmonize_core.estimate import describe_seconds, item_seconds, stage_seconds, working_pixels

    paper = preset("paper")
    hours = item_seconds(paper, pixels=working_pixels(700, (564, 700)), threads=2) / 3600
    assert 0.5 < hours < 2  # docs/performance.md: about 1.5 h per paper item on the 2-core reference CPU
    quick = preset("quick")
    assert stage_seconds(quick, "pass1", threads=2) < stage_seconds(paper, "pass1", threads=2) / 20
    assert stage_seconds(paper, "pass1", threads=4) == pytest.approx(stage_seconds(paper, "pass1", threads=2) / 2)
    assert item_seconds(paper, device_type="cuda") is None  # no GPU figures: no guess
    assert [describe_seconds(s) for s in (42, 600, 9000)] == ["42 s", "10 min", "2.5 h"]


def test_runtime_fields_never_change_a_stage_section():
    base = preset("quick")
    runtime = apply_overrides(base, {"pass1.log_every": 3, "pass1.match_budget_mb": 64, "pass2.max_seconds": 9.0})
    for stage in ("dilate", "pass1", "blend", "pass2", "reconstruct"):
        assert config_digest(stage_section(runtime, stage)) == config_digest(stage_section(base, stage)), stage
    changed = apply_overrides(base, {"pass1.iterations": 61})
    assert stage_section(changed, "pass1") != stage_section(base, "pass1")
    assert stage_section(changed, "pass2") == stage_section(base, "pass2")


def test_the_optimisation_stops_at_its_deadline():
    backbone = load_backbone("vgg16", "random:0")
    x = torch.rand(1, 3, 24, 24)
    terms = [Term("content", "relu1_1", lambda f: f.square().mean(), 1.0)]
    masks = {"relu1_1": torch.ones(1, 1, 24, 24)}
    problem = Problem(backbone, terms, masks, torch.ones(1, 3, 24, 24), normalize=False)
    settings = LbfgsSettings(1000, 1.0, 10, -1.0, -1.0, 100, max_seconds=1e-9)
    with pytest.raises(StageTimeoutError, match="limit"):
        optimise(problem, x, settings, stage="pass1")


# --- an explicit value equal to the default keys like the default --------------------------------------------------


def _cells(value):
    """The ways a manifest cell, a flag or a flow parameter can give ``value``."""
    if isinstance(value, bool):
        return [value, str(value), str(value).lower(), "1" if value else "0"]
    if isinstance(value, tuple):
        return [value, list(value), ",".join(value)]
    if isinstance(value, float):
        return [value, repr(value), f" {value!r} "] + ([int(value), str(int(value))] if value.is_integer() else [])
    if isinstance(value, int):
        return [value, str(value), float(value), f"{value}.0"]
    return [value, f" {value} "]


def _sections(config):
    return {stage: stage_section(config, stage) for stage in STAGE_SECTIONS}


@pytest.mark.parametrize(("name", "field"), [(n, f) for n, f in _all_fields() if "." in n])
def test_every_setting_given_explicitly_at_its_default_keys_like_the_default(name, field):
    base = HarmonizeConfig()
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if default is None:  # pass2.tau: empty means the default 5
        assert name == "pass2.tau"
        explicit = [DEFAULT_TAU, 5, "5", "5.0", " 5 "]
    else:
        explicit = _cells(default)
    for value in explicit:
        assert (_sections(apply_overrides(base, {name: value})), value) == (_sections(base), value)


def test_a_manifest_row_or_flag_with_tau_5_shares_the_empty_rows_pass2_and_other_values_do_not():
    digests = {"content": "c", "style": "s", "mask": "m", "loose": "l", "blended": "b"}

    def pass2_key(run_tau=None, cell=None):
        run = RunSettings(preset="quick", overrides={"tau": run_tau} if run_tau is not None else {})
        config = resolve_config(run, {"tau": cell} if cell is not None else {})
        return caching.stage_cache_key("pass2", digests, config, "w")

    empty = pass2_key(cell="")
    assert [pass2_key(), pass2_key(cell="5"), pass2_key(cell="5.0"), pass2_key(run_tau="5"),
            pass2_key(run_tau="1", cell="5")] == [empty] * 5
    assert len({empty, pass2_key(cell="1"), pass2_key(cell="auto"), pass2_key(run_tau="10")}) == 4


def test_early_stopping_cadence_keys_only_while_early_stopping_is_on():
    base = HarmonizeConfig()
    cadence = {"pass2.stop_every": 10, "pass2.stop_patience": 5}
    assert stage_section(base.replace(**cadence), "pass2") == stage_section(base, "pass2")
    on = base.replace(**{"pass2.stop_levels": 1.0})
    assert stage_section(on.replace(**cadence), "pass2") != stage_section(on, "pass2")
    assert stage_section(on.replace(**cadence), "pass2")["pass2"]["stop_every"] == 10
    assert stage_section(base.replace(**{"pass2.stop_levels": -1.0}), "pass2") == stage_section(base, "pass2")


def test_a_section_read_back_from_json_or_written_before_is_canonical_again():
    section = stage_section(preset("quick"), "pass2")
    assert canonical_section(json.loads(json.dumps(section))) == section
    older = json.loads(json.dumps(section))  # as earlier versions recorded it: tau empty, tuples, ints
    older["pass2"].update(tau=None, style_layers=tuple(older["pass2"]["style_layers"]), content_weight=1,
                          stop_every=7)
    assert canonical_section(older) == section
