"""Which ONNX Runtime is installed: the runtime does not pick one, it uses whichever the machine has.

Every ONNX Runtime build installs the same `onnxruntime` module: the CPU wheel (`onnxruntime`), the CUDA
wheel (`onnxruntime-gpu`), NVIDIA's JetPack wheels for Jetson (also named `onnxruntime-gpu`), DirectML,
OpenVINO... Two of them side by side overwrite each other's files, which is why the runtime's package
does not depend on one: `pip install 'edgeprune-runtime[cpu]'` adds the CPU wheel, `[cuda]` the CUDA wheel,
and a plain install uses the build already there (a Jetson's JetPack wheel stays untouched).
"""

from __future__ import annotations

from importlib import metadata

from edgeprune_runtime.errors import RuntimeStatusError, Status

# Distributions known to install the `onnxruntime` module (PyPI names; JetPack's wheels are onnxruntime-gpu).
DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-qnn", "onnxruntime-training", "ort-nightly", "ort-nightly-gpu")

INSTALL_HINT = ("pip install 'edgeprune-runtime[cpu]' on a PC, 'edgeprune-runtime[cuda]' with an NVIDIA GPU, "
                "or on a Jetson JetPack's onnxruntime-gpu wheel (README: Install)")


def installed_distributions() -> list[tuple[str, str]]:
    """[(distribution, version)] of every known ONNX Runtime distribution installed (normally one)."""
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            pass
    return found


def onnxruntime():
    """The `onnxruntime` module. Raises RuntimeStatusError(DEPENDENCY_MISSING) naming the install commands
    when none is importable, or when two builds were installed over each other (their files are mixed)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeStatusError(Status.DEPENDENCY_MISSING,
                                 f"ONNX Runtime is not installed ({_first_line(e)}); {INSTALL_HINT}") from None
    dists = installed_distributions()
    if len(dists) > 1:
        names = " ".join(n for n, _ in dists)
        raise RuntimeStatusError(
            Status.DEPENDENCY_MISSING,
            f"{len(dists)} ONNX Runtime builds are installed over each other ({', '.join(f'{n} {v}' for n, v in dists)}) "
            f"and their files are mixed; run `pip uninstall -y {names}` and install one of them again")
    return ort


def describe() -> dict:
    """{"distributions": [[name, version], ...], "version", "providers"}; version and providers are None
    when no ONNX Runtime can be imported. Never raises (for --version and diagnostics)."""
    info: dict = {"distributions": [list(d) for d in installed_distributions()], "version": None, "providers": None}
    try:
        import onnxruntime as ort

        info["version"] = ort.__version__
        info["providers"] = list(ort.get_available_providers())
    except Exception:  # a missing or broken install is what this is asked to report, not to fail on
        pass
    return info


def version_line(package: str, version: str) -> str:
    """One line for `--version`: this package's version and the ONNX Runtime it will use."""
    info = describe()
    if info["version"] is None:
        ort = f"no ONNX Runtime ({INSTALL_HINT})"
    else:
        dist = ", ".join(f"{n} {v}" for n, v in info["distributions"]) or f"onnxruntime {info['version']}"
        ort = f"{dist}; providers {', '.join(info['providers'])}"
    return f"{package} {version} ({ort})"


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
