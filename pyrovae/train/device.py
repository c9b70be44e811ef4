"""Where a model runs: one resolver for the ``--device`` option and the ``device=`` / ``accelerator=``
keywords of the Python API.

``auto`` picks CUDA when torch sees a GPU, else the CPU. Asking for a device this torch cannot use (a
CPU-only build asked for CUDA, a GPU index that does not exist, an unknown name) raises one
``ValueError`` that names the problem and the fix; the CLI prints it as ``pyrovae CMD: error: ...``.
"""

from __future__ import annotations

import torch

#: the values ``--device`` offers on the command line (``cuda:N`` is accepted too)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
_ALIASES = {"gpu": "cuda"}  # scvi-tools / Lightning spell it accelerator="gpu"


def cuda_summary() -> str:
    """One phrase about this torch's CUDA support (for error messages)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no GPU"


def resolve_device(device: str | int | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` for ``device``.

    Args:
        device: ``"auto"`` / ``None`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` / ``"gpu"``,
            ``"cuda:N"``, an int N (GPU N), ``"mps"``, or a :class:`torch.device`.

    Raises:
        ValueError: unknown name, or a device this torch / machine cannot use.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is None:
        device = "auto"
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise ValueError(f"device must be a string like 'auto', 'cpu' or 'cuda:0', got {device!r}")
    if isinstance(device, int):
        device = f"cuda:{device}"
    name = _ALIASES.get(device.strip().lower(), device.strip().lower())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind in _ALIASES:
        kind = _ALIASES[kind]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for CUDA, but {cuda_summary()}; use --device cpu or auto "
                "(Python: device='cpu'), or install a CUDA build of torch on a machine with a GPU"
            )
        if index:
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise ValueError(
                    f"device {device!r}: no such GPU; this machine has {torch.cuda.device_count()} "
                    f"(use cuda:0 to cuda:{torch.cuda.device_count() - 1})"
                )
            return torch.device("cuda", int(index))
        return torch.device("cuda")
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: this torch has no MPS (Apple GPU) support; use cpu or auto")
        return torch.device("mps")
    raise ValueError(
        f"unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)} or cuda:N (a GPU index)"
    )


def check_device_name(device: str) -> None:
    """Raise a one-line ValueError unless ``device`` is a device name (its availability is checked where a
    model is placed, by :func:`resolve_device`, so a run trained on a GPU still loads on a CPU machine)."""
    name = _ALIASES.get(str(device).strip().lower(), str(device).strip().lower())
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"option device: {device!r} is not a torch device; use one of {', '.join(DEVICE_CHOICES)} "
            "or cuda:N"
        ) from None


def device_rng_state(device: torch.device | str) -> dict[str, torch.Tensor]:
    """The RNG state of ``device`` beyond the CPU generator: ``{"cuda_rng": ByteTensor}`` on CUDA, else {}."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    return {"cuda_rng": torch.cuda.get_rng_state(device)}


def set_device_rng_state(state: dict, device: torch.device | str) -> None:
    """Restore what :func:`device_rng_state` saved (a no-op off CUDA or when the state has none)."""
    device = torch.device(device)
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
