"""Precision where the CPU has it: the `fast` preset picks bfloat16 on AVX512-BF16/AMX CPUs.

The detection is tested with fake flag lists, so these tests hold on CPUs with and
without those instructions.
"""

from __future__ import annotations

import json

import pytest

from delf_tf import presets
from delf_tf.config import PER_HOST_FIELDS, ExtractionConfig, ModelConfig

EPYC_BF16 = "fpu vme avx2 avx512f avx512_bf16 avx512_vnni"  # an AVX512-BF16 EPYC
SAPPHIRE_RAPIDS = "avx2 avx512f amx_bf16 amx_tile amx_int8"
OLDER = "fpu vme sse4_2 avx2 fma avx512f"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(EPYC_BF16, "bfloat16"), (SAPPHIRE_RAPIDS, "bfloat16"), (OLDER, "float32"), ("", "float32")],
)
def test_host_precision_from_cpu_flags(flags, expected):
    assert presets.host_precision(flags.split()) == expected
    assert presets.preset_precision("fast", flags.split()) == expected
    assert presets.preset_precision("paper", flags.split()) is None
    assert presets.preset_precision(None, flags.split()) is None


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {EPYC_BF16}\n\n"
        f"processor\t: 1\nflags\t\t: {EPYC_BF16}\n"
    )
    assert presets.cpu_flags(str(cpuinfo)) == frozenset(EPYC_BF16.split())
    assert presets.cpu_flags(str(tmp_path / "none")) == frozenset()  # not Linux
    assert presets.host_precision(presets.cpu_flags(str(cpuinfo))) == "bfloat16"


@pytest.mark.parametrize(
    ("cap", "expected"),
    [("AVX2", "float32"), ("avx512_core", "float32"), ("AVX512_CORE_BF16", "bfloat16")]
    + [("AVX512_CORE_AMX", "bfloat16"), ("", "bfloat16")],
)
def test_a_onednn_isa_cap_below_bfloat16_means_float32(monkeypatch, cap, expected):
    monkeypatch.setattr(presets, "cpu_flags", lambda: frozenset(EPYC_BF16.split()))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert presets.host_precision() == expected


def test_fast_preset_takes_the_hosts_precision_and_a_flag_overrides(monkeypatch):
    from delf_tf.extraction.extractor import build_extractor

    model_config = ModelConfig(backbone="tiny", feature_depth=16, attention_hidden_units=8)
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # only the fake flags decide
        monkeypatch.delenv(cap, raising=False)
    for flags, expected in ((EPYC_BF16, "bfloat16"), (OLDER, "float32")):
        monkeypatch.setattr(presets, "cpu_flags", lambda flags=flags: frozenset(flags.split()))
        extractor = build_extractor(preset="fast", model_config=model_config)
        assert extractor.config.precision == expected
        assert extractor.describe()["precision"] == expected  # recorded in stores and indexes
    monkeypatch.setattr(presets, "cpu_flags", lambda: frozenset(EPYC_BF16.split()))
    chosen = build_extractor(
        preset="fast", model_config=model_config, overrides={"precision": "float32"}
    )
    assert chosen.config.precision == "float32"
    assert build_extractor(model_config=model_config).config.precision == "float32"  # paper


def test_a_query_may_run_in_another_precision_than_its_collection(delf_model, small_config):
    """Precision is chosen per host: not part of the fingerprint, named as such in config."""
    from delf_tf.extraction import InProcessExtractor

    float32 = InProcessExtractor.from_model(delf_model, small_config)
    bfloat16 = InProcessExtractor.from_model(delf_model, small_config.replace(precision="bfloat16"))
    assert float32.fingerprint == bfloat16.fingerprint
    assert "precision" in PER_HOST_FIELDS and "precision" in ExtractionConfig().to_dict()


# bfloat16 runs only where the CPU has it: oneDNN has no bfloat16 convolution below
# AVX-512 (under ONEDNN_MAX_CPU_ISA=AVX2 every image fails), which is why `fast` asks.
HOST_HAS_BF16 = presets.host_precision() == "bfloat16"


@pytest.mark.parametrize(
    "flags",
    [
        OLDER,
        pytest.param(
            SAPPHIRE_RAPIDS,
            marks=pytest.mark.skipif(not HOST_HAS_BF16, reason="this CPU has no bfloat16"),
        ),
    ],
)
def test_extract_summary_says_which_precision(
    tmp_path, capsys, monkeypatch, astronaut_small, flags
):
    from PIL import Image

    from delf_tf.cli import main

    expected = presets.host_precision(flags.split())
    Image.fromarray(astronaut_small[:64, :64]).save(tmp_path / "a.png")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"backbone": "tiny", "feature_depth": 16}))
    monkeypatch.setattr(presets, "cpu_flags", lambda: frozenset(flags.split()))
    argv = ["extract", f"--images={tmp_path / 'a.png'}", f"--output_dir={tmp_path / 'f'}"]
    argv += [f"--model_config={config}", "--preset=fast", "--score_threshold=0"]
    assert main(["delf", *argv]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == expected
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["extractor"]["precision"] == expected


@pytest.mark.parametrize(
    ("recorded", "flags", "expected"),
    [
        ("bfloat16", OLDER, "float32"),
        ("bfloat16", EPYC_BF16, "bfloat16"),
        ("float32", EPYC_BF16, "float32"),
        ("float16", OLDER, "float16"),
    ],
)
def test_a_query_runs_in_its_hosts_precision(monkeypatch, recorded, flags, expected):
    """The index records bfloat16 (a `fast` collection on a bfloat16 CPU); a query on
    another CPU runs in float32, with the index's other settings."""
    from delf_tf.cli import command_flags
    from delf_tf.commands.common import extractor_from_flags

    assert presets.precision_for_host(recorded, flags.split()) == expected
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(cap, raising=False)
    monkeypatch.setattr(presets, "cpu_flags", lambda: frozenset(flags.split()))
    _, flag_values = command_flags("match")
    flag_values(["delf match", "--image1=a", "--image2=b", "--model_config=x.json"])
    flag_values.model_config = None  # the default ResNet50 config is not built: see below
    built = {}

    def fake_build(**arguments):
        built.update(arguments)
        return "extractor"

    monkeypatch.setattr("delf_tf.extraction.extractor.build_extractor", fake_build)
    recorded_config = ExtractionConfig(max_features=7, precision=recorded).to_dict()
    assert extractor_from_flags(flag_values, recorded=recorded_config) == "extractor"
    assert built["config"].precision == expected and built["config"].max_features == 7


def test_a_store_resumes_in_another_precision(tmp_path):
    """Settings must match to resume a store, but precision is the host's."""
    from delf_tf.features import FeatureStore, StoreMismatchError

    def description(**fields):
        return {"model": "m", "extraction_config": ExtractionConfig(**fields).to_dict()}

    FeatureStore.open_or_create(tmp_path, "a" * 64, description(precision="bfloat16"))
    FeatureStore.open_or_create(tmp_path, "a" * 64, description(precision="float32"))
    with pytest.raises(StoreMismatchError, match="max_features"):
        FeatureStore.open_or_create(tmp_path, "a" * 64, description(max_features=7))
