"""dgemma: local fill-in-the-middle and inline edits on DiffusionGemma."""
import ctypes
import os
import sys
from pathlib import Path

__version__ = "0.1.0"

# OpenMP threads that spin while waiting make a CPU model 10-40x slower as soon as anything
# else wants the cores (an editor, a build; measured: a 1.3 s fill took 49 s next to one busy
# process). Sleeping waiters cost microseconds. It must be set before torch loads OpenMP, and
# every dgemma entry point imports this package first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_blocks() -> None:
    """Let glibc reuse freed large blocks instead of returning them to the kernel.

    Every denoising step allocates several canvas x vocabulary fp32 tensors (8 MiB each on the
    bundled model). Above glibc's mmap threshold each one is a fresh mapping that faults in page by
    page and is unmapped on free: measured 800k minor faults and 43 ms of sampling per step, against
    68k faults and 15 ms with these settings. A user's own MALLOC_* variables win.
    """
    if sys.platform != "linux" or any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl has no mallopt)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)


_keep_freed_blocks()


def _keep_installed_packages_first() -> None:
    """Keep folders that carry the names of installed packages from shadowing them.

    dgemma's checkout has top-level folders named like installed packages: `kernels/` is Hugging
    Face's kernels, which transformers >= 5.25 imports, and `daemon/` is python-daemon. Any
    folder can (a user's workspace). Two ways put such a folder first on sys.path:
    - `python -m dgemma.…` puts the caller's working directory first. While the package is being
      located sys.argv[0] is "-m"; dgemma needs nothing from that directory, so it is dropped.
    - Standing in the checkout, or running `python bench/x.py` (whose folder holds a
      `kernels.py`). The checkout root and its own folders move behind site-packages, where they
      still serve what only they provide (`train`, `bench`, the tests' helpers). A wheel install
      has no checkout (no pyproject.toml beside the package): nothing moves there.
    """
    if sys.argv[:1] == ["-m"] and sys.path and Path(sys.path[0] or ".").resolve() == Path.cwd():
        del sys.path[0]
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "kernels" / "__init__.py").is_file():
        return
    # The root and its own folders only: a virtualenv inside the checkout keeps its place.
    inside = [p for p in sys.path if root in (Path(p or ".").resolve(), Path(p or ".").resolve().parent)]
    for p in inside:
        sys.path.remove(p)
    sys.path.extend(inside)


_keep_installed_packages_first()
