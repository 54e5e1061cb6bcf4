"""Downloads fetch only what the loaders read; each way a download fails has its own message; no GPU is said
plainly; the dtype asked for is the dtype loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flywheel.errors import ModelNotFoundError, NoGPUError
from flywheel.models.hub import (
    allow_patterns,
    count_parameters,
    resolve_model,
    select_files,
    weight_files,
)

# The file lists of the hub repos black-forest-labs/FLUX.1-dev and Qwen/Qwen2-VL-2B-Instruct.
FLUX_DEV_FILES = [
    ".gitattributes", "LICENSE.md", "README.md", "ae.safetensors", "dev_grid.jpg", "flux1-dev.safetensors",
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
FLUX_DEV_MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
QWEN2_VL_FILES = [
    "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
    "chat_template.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "LICENSE",
    "README.md",
]
NOT_LOADED = {".gitattributes", "LICENSE.md", "README.md", "ae.safetensors", "dev_grid.jpg", "flux1-dev.safetensors"}


def test_flux_dev_downloads_its_components_and_never_the_root_checkpoints():
    chosen = set(select_files(FLUX_DEV_FILES, allow_patterns(FLUX_DEV_MODEL_INDEX)))
    assert chosen == set(FLUX_DEV_FILES) - NOT_LOADED
    # model code only when trusted; pickles never
    assert not any(p.endswith(".py") for p in allow_patterns(FLUX_DEV_MODEL_INDEX))
    code = set(select_files(["transformer/custom.py", "pipeline.py", "unet/diffusion_pytorch_model.bin"],
                            allow_patterns({**FLUX_DEV_MODEL_INDEX, "unet": ["diffusers", "X"]}, trust_remote_code=True)))
    assert code == {"transformer/custom.py"}


def test_a_transformers_repo_downloads_its_root_files_as_before():
    chosen = set(select_files(QWEN2_VL_FILES, allow_patterns(None)))
    assert chosen == set(QWEN2_VL_FILES) - {"LICENSE", "README.md"}
    assert "modeling_qwen.py" in select_files(["modeling_qwen.py"], allow_patterns(None, trust_remote_code=True))
    assert not select_files(["modeling_qwen.py", "pytorch_model.bin"], allow_patterns(None))


def _hub_repo(tmp_path: Path, tiny_flux_dir: Path) -> Path:
    """FLUX.1-dev's layout on a tiny scale: the diffusers folders plus root single-file checkpoints, a
    half-precision variant and files no loader reads."""
    repo = tmp_path / "remote"
    shutil.copytree(tiny_flux_dir, repo)
    (repo / ".flywheel-tiny-complete").unlink(missing_ok=True)  # the tiny builder's own marker
    shutil.copy(repo / "transformer" / "diffusion_pytorch_model.safetensors", repo / "flux1-dev.safetensors")
    shutil.copy(repo / "vae" / "diffusion_pytorch_model.safetensors", repo / "ae.safetensors")
    shutil.copy(repo / "vae" / "diffusion_pytorch_model.safetensors", repo / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    (repo / "README.md").write_text("# FLUX.1 [dev]")
    (repo / "dev_grid.jpg").write_bytes(b"\xff\xd8\xff")
    return repo


def test_hub_download_fetches_and_counts_only_what_the_loader_reads(tmp_path, monkeypatch, tiny_flux_dir):
    """resolve_model through a stand-in hub that serves a FLUX-like repo the way snapshot_download does
    (allow_patterns, one snapshot folder): the root checkpoints never reach the cache, and the parameter
    count of the repo as `hf download` leaves it (root files included) equals that of what was fetched."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    repo = _hub_repo(tmp_path, tiny_flux_dir)
    remote = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    asked = []

    def fake_snapshot_download(repo_id, *, cache_dir, allow_patterns, local_files_only, **kw):
        asked.append(list(allow_patterns))
        snap = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / ("0" * 40)
        for rel in filter_repo_objects(remote, allow_patterns=allow_patterns):
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / rel, snap / rel)
        return str(snap)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = resolve_model("black-forest-labs/FLUX.1-dev", name="flux-dev")
    fetched = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert asked[0] == ["model_index.json", "config.json"]  # the layout first, then its files
    assert fetched == set(remote) - {"flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg",
                                     "vae/diffusion_pytorch_model.fp16.safetensors"}
    assert {"model_index.json", "transformer/diffusion_pytorch_model.safetensors", "tokenizer_2/tokenizer.json",
            "text_encoder_2/model.safetensors", "scheduler/scheduler_config.json"} <= fetched
    loaded = count_parameters(tiny_flux_dir)  # the four component weights, nothing else
    assert count_parameters(folder) == count_parameters(repo) == loaded
    # A component folder counts as the pipeline's loader reads it (the memory check sizes components).
    assert count_parameters(repo / "vae") == count_parameters(tiny_flux_dir / "vae")
    assert sorted(p.relative_to(repo).as_posix() for p in weight_files(repo)) == [
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]


def test_models_info_counts_a_local_folder_without_its_root_checkpoints(tmp_path, tiny_flux_dir):
    from click.testing import CliRunner

    from flywheel.cli import main

    repo = _hub_repo(tmp_path, tiny_flux_dir)
    res = CliRunner().invoke(main, ["-C", str(tmp_path), "models", "info", str(repo)])
    assert res.exit_code == 0, res.output
    shown = int(next(line for line in res.output.splitlines() if "parameters:" in line).split(":")[1].replace(",", ""))
    assert shown == count_parameters(tiny_flux_dir)[0]


# --- errors -------------------------------------------------------------------------------------------
def _http_error(cls, status: int, message: str):
    """A real huggingface_hub HTTP error, with a response from the HTTP library it is built on."""
    import importlib

    import huggingface_hub.errors as hub_errors

    http = importlib.import_module(hub_errors.Response.__module__.split(".")[0])
    url = "https://huggingface.co/api/models/black-forest-labs/FLUX.1-dev"
    return cls(message, response=http.Response(status, request=http.Request("GET", url)))


def _raising(err: BaseException):
    def fake(*args, **kwargs):
        raise err
    return fake


def test_not_downloaded_while_offline_says_hf_hub_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("black-forest-labs/FLUX.1-dev", name="flux-dev")  # the real snapshot_download, offline
    assert message(err) == (
        f"model 'flux-dev' (black-forest-labs/FLUX.1-dev) is not downloaded: looked in "
        f"{tmp_path / 'hf' / 'hub' / 'models--black-forest-labs--FLUX.1-dev'}, and HF_HUB_OFFLINE is set, "
        "so the hub was not asked")
    assert err.value.hint.startswith('run `hf download black-forest-labs/FLUX.1-dev --include model_index.json '
                                     '--include "*/*"` on a machine with internet')


def test_unreachable_hub_is_not_blamed_on_offline_mode(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset and nothing listening at the hub's address: the real snapshot_download fails to
    connect, and the message says the hub cannot be reached (and never that HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("Qwen/Qwen2-VL-2B-Instruct", name="qwen2-vl-2b")
    msg = message(err)
    assert msg.startswith("model 'qwen2-vl-2b' (Qwen/Qwen2-VL-2B-Instruct) is not downloaded (looked in ")
    assert "and the Hugging Face Hub cannot be reached: ConnectError:" in msg
    assert "HF_HUB_OFFLINE" not in msg and "\n" not in msg
    assert err.value.hint.startswith("check the network or proxy (HTTPS_PROXY) and retry, or run "
                                     "`hf download Qwen/Qwen2-VL-2B-Instruct` where there is internet")


def test_gated_missing_repo_missing_file_and_refused_login_each_say_what_to_do(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    monkeypatch.delenv("HF_HUB_OFFLINE")
    cases = [
        (_http_error(GatedRepoError, 403, "403 Client Error. Cannot access gated repo"),
         "model 'flux-dev' (black-forest-labs/FLUX.1-dev) is gated: its licence must be accepted on "
         "https://huggingface.co/black-forest-labs/FLUX.1-dev by the account whose token Flywheel uses",
         "accept the licence on https://huggingface.co/black-forest-labs/FLUX.1-dev, then `hf auth login` "
         "(or set HF_TOKEN) and retry"),
        (_http_error(RepositoryNotFoundError, 404, "404 Client Error. Repository Not Found"),
         "model 'flux-dev': the Hugging Face Hub has no repository black-forest-labs/FLUX.1-dev "
         "(or it is private to another account)",
         "check the id on https://huggingface.co/black-forest-labs/FLUX.1-dev or pick a preset (`flywheel models "
         "list`); private repositories need `hf auth login`"),
        (EntryNotFoundError("404 Client Error. Entry Not Found for url: .../model_index.json"),
         "model 'flux-dev' (black-forest-labs/FLUX.1-dev): a file the loader needs is missing on the hub: "
         "EntryNotFoundError: 404 Client Error. Entry Not Found for url: .../model_index.json",
         "check the repository's files on https://huggingface.co/black-forest-labs/FLUX.1-dev, or point the model "
         "at a complete local folder"),
        (_http_error(HfHubHTTPError, 401, "401 Client Error. Invalid credentials"),
         "model 'flux-dev' (black-forest-labs/FLUX.1-dev): the Hugging Face Hub refused the download (not logged "
         "in, or the token is invalid): HfHubHTTPError: 401 Client Error. Invalid credentials",
         "`hf auth login` (or set HF_TOKEN) and retry"),
    ]
    for exc, text, hint in cases:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", _raising(exc))
        with pytest.raises(ModelNotFoundError) as err:
            resolve_model("black-forest-labs/FLUX.1-dev", name="flux-dev")
        assert message(err) == text and err.value.hint == hint


def test_the_cli_shows_a_download_error_as_two_lines_without_a_traceback(monkeypatch, tmp_path):
    import huggingface_hub
    from click.testing import CliRunner
    from huggingface_hub.errors import GatedRepoError

    from flywheel.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        _raising(_http_error(GatedRepoError, 403, "403 Client Error. Cannot access gated repo")))
    res = CliRunner().invoke(main, ["-C", str(tmp_path), "models", "info", "flux-dev", "--device", "cpu"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.splitlines() == [
        "Error: model 'flux-dev' (black-forest-labs/FLUX.1-dev) is gated: its licence must be accepted on "
        "https://huggingface.co/black-forest-labs/FLUX.1-dev by the account whose token Flywheel uses",
        "Hint: accept the licence on https://huggingface.co/black-forest-labs/FLUX.1-dev, then `hf auth login` "
        "(or set HF_TOKEN) and retry"]


def message(err) -> str:
    return str(err.value).split("\n  hint: ")[0]


# --- no GPU -------------------------------------------------------------------------------------------
def _no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_full_size_preset_without_a_gpu_points_to_the_cpu_config_before_any_download(monkeypatch, tmp_path):
    import huggingface_hub

    from flywheel.config import ModelsConfig
    from flywheel.models import load_editor, load_text_to_image, load_vlm

    _no_cuda(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raising(AssertionError("no download may start")))
    for load, spec in ((load_text_to_image, "flux-dev"), (load_editor, "qwen-image-edit-2511"), (load_vlm, "qwen2-vl-2b")):
        with pytest.raises(NoGPUError) as err:
            load(spec)
        assert message(err) == f"model '{spec}' is a full-size model and this machine has no CUDA GPU " \
                                       '(device = "auto")'
        assert "configs/examples/cpu-only.toml" in err.value.hint
        for what in ("composite editor", "tiny-* presets", "review", "export", 'device = "cpu"'):
            assert what in err.value.hint
    # Asked for explicitly, the CPU is what the user wants: it goes on to the download (offline: not there).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raising(
        huggingface_hub.errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")))
    with pytest.raises(ModelNotFoundError, match="is not downloaded"):
        load_text_to_image("flux-dev", ModelsConfig(device="cpu"))


def test_tiny_models_and_small_folders_still_load_on_a_cpu_with_device_auto(monkeypatch, tiny_flux_dir, tmp_path):
    from flywheel.models import load_text_to_image
    from flywheel.models.hub import FULL_SIZE_PARAMS, check_cpu_can_run

    _no_cuda(monkeypatch)
    assert load_text_to_image("tiny").params()["device"] == "cpu"
    assert load_text_to_image(str(tiny_flux_dir)).params()["device"] == "cpu"
    # A folder is judged by its parameter count (read from the safetensors headers): as big as the threshold
    # is full size.
    from flywheel.models import hub

    assert count_parameters(tiny_flux_dir)[0] < FULL_SIZE_PARAMS
    monkeypatch.setattr(hub, "FULL_SIZE_PARAMS", count_parameters(tiny_flux_dir)[0])
    with pytest.raises(NoGPUError, match=f"model '{tiny_flux_dir.name}' is a full-size model"):
        check_cpu_can_run(tiny_flux_dir.name, "auto", folder=tiny_flux_dir)
    check_cpu_can_run(tiny_flux_dir.name, "cpu", folder=tiny_flux_dir)


# --- dtype --------------------------------------------------------------------------------------------
def test_the_loader_loads_flux_in_the_dtype_asked_for(tiny_flux_dir):
    """diffusers < 0.40 ignored from_pretrained(dtype=...) and loaded float32: the floor in pyproject.toml
    is where it is honoured, and this is what it buys."""
    import torch

    from flywheel.config import ModelsConfig
    from flywheel.models import load_text_to_image

    flux = load_text_to_image(str(tiny_flux_dir), ModelsConfig(device="cpu"), dtype="bfloat16")
    pipe = flux.pipe
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.text_encoder_2.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.bfloat16
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    default = load_text_to_image(str(tiny_flux_dir), ModelsConfig(device="cpu"))
    assert default.pipe.transformer.dtype == torch.float32  # exact and fast on a CPU
    assert json.loads((tiny_flux_dir / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
