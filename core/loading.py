"""Model folders: checking them, and loading a tokenizer, a chat template or a model with one-line errors.

Every step that reads a model folder (extraction, alignment, training, evaluation, implicit fusion)
loads it through here, so a wrong path, a file given for a folder, a broken tokenizer or missing
weights always gives the same one line naming the folder, never a traceback from transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import PivotfuseError
from core.files import read_text

# Files of a model folder that belong to its tokenizer and chat template (copied into every model
# made from it); the rest are weights, configs and training leftovers.
_NOT_TOKENIZER = {"config.json", "generation_config.json", "README.md", "training_args.bin"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def refuse_file_as_folder(path: str | Path, label: str) -> None:
    """Raise when `path`, given as a model folder, is a file: say so rather than "folder not found"."""
    if Path(path).is_file():
        raise PivotfuseError(f"{label}: {path} is a file, not a model folder")


def refuse_inside(out: str | Path, folder: str | Path, label: str) -> None:
    """Raise when output `out` is `folder` or lies inside it: inputs are never modified."""
    o, f = Path(out).resolve(), Path(folder).resolve()
    if o == f or f in o.parents:
        where = "is" if o == f else "is inside"
        raise PivotfuseError(f"{label}: {out} {where} the input model folder {folder}; inputs are never modified")


def check_tokenizer_folder(path: str | Path, label: str = "model") -> None:
    """A folder with tokenizer files (a model folder, or a tokenizer alone)."""
    folder = Path(path)
    refuse_file_as_folder(path, label)
    if not folder.is_dir():
        raise PivotfuseError(f"{path}: model folder not found")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise PivotfuseError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")


def check_model_folder(path: str | Path, label: str = "model") -> None:
    """A folder with a model (config.json)."""
    folder = Path(path)
    refuse_file_as_folder(folder, label)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise PivotfuseError(f"{folder}: not a model folder (no config.json)")


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


# Tokenizers loaded with `shared=True`, by folder, load options and the folder's files (name, size,
# mtime): one pair's map, rows and end-of-turn tokens load a 152k-vocabulary tokenizer once (about a
# second each time), and forked workers inherit them.
_SHARED: dict[tuple, Any] = {}


def _files_signature(folder: Path) -> tuple:
    stats = ((f.name, f.stat()) for f in folder.iterdir() if f.is_file())
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


def load_tokenizer(path: str | Path, *, model: bool = False, fast: bool = False, name: str | None = None,
                   shared: bool = False, **kwargs: Any) -> Any:
    """`AutoTokenizer` of folder `path`. `model`: the folder must hold a model too (config.json),
    else tokenizer files suffice; `fast`: refuse a slow tokenizer (character offsets need a fast
    one); `name` prefixes the errors (a model's name in a run). `shared`: the one object of this
    process for this folder and options (loaded again when a file changes) — for callers that only
    read it; a caller that sets a pad token or a template must load its own."""
    from transformers import AutoTokenizer

    (check_model_folder if model else check_tokenizer_folder)(path)
    who = f"{name}: " if name else ""
    key = (str(Path(path).resolve()), tuple(sorted(kwargs.items())), _files_signature(Path(path))) if shared else None
    tok = _SHARED.get(key) if key is not None else None
    if tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
        except Exception as e:  # noqa: BLE001 - any load failure is a bad folder
            raise PivotfuseError(f"{who}{path}: cannot load the tokenizer ({_why(e)})") from None
        if key is not None:
            _SHARED[key] = tok
    if fast and not getattr(tok, "is_fast", False):
        raise PivotfuseError(f"{who}{path}: needs a fast tokenizer (tokenizer.json) for character offsets")
    return tok


def read_chat_template(file: str | Path | None) -> str | None:
    """The text of a jinja chat-template file (None: none given)."""
    if file is None:
        return None
    if not Path(file).is_file():
        raise PivotfuseError(f"{file}: chat template file not found")
    return read_text(file)


def chat_template(tokenizer: Any, file: str | Path | None, who: str, hint: str = "--chat-template FILE") -> str:
    """The chat template a model reads with: the file's, else its tokenizer's; `who` names the
    tokenizer in the error when it has none ("M: tokenizer")."""
    template = read_chat_template(file) if file else getattr(tokenizer, "chat_template", None)
    if not template:
        raise PivotfuseError(f"{who} has no chat template (pass {hint})")
    return template


def load_causal_lm(path: str | Path, *, dtype: Any = None, device_map: Any = None, name: str | None = None,
                   **kwargs: Any) -> Any:
    """`AutoModelForCausalLM` of folder `path`, in eval mode."""
    from transformers import AutoModelForCausalLM

    who = f"{name}: " if name else ""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device_map, **kwargs)
    except Exception as e:  # noqa: BLE001 - any load failure is a bad folder
        raise PivotfuseError(f"{who}{path}: cannot load the model ({_why(e)})") from None
    return model.eval()


def vocab_size(path: str | Path) -> int | None:
    """Rows of the model's output layer as its config gives them (no weights read); None if unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 - loading the model names the problem
        return None
    size = getattr(config.get_text_config(), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def stored_dtype(path: str | Path) -> Any:
    """The dtype a model folder's weights are stored in (config `dtype`/`torch_dtype`), float32 when unknown."""
    import torch
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(str(path))
    dt = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy a model folder's tokenizer and chat-template files byte for byte (not re-serialised)."""
    import shutil

    for f in src.iterdir():
        if f.is_file() and f.name not in _NOT_TOKENIZER and not f.name.startswith("model") and \
                f.suffix not in _WEIGHT_SUFFIXES:
            shutil.copy2(f, dst / f.name)
