"""Compile once: torch.compile's on-disk caches kept in mgtq's user cache folder.

A compiled forward costs Dynamo tracing + AOTAutograd + Inductor code generation and C++ builds.
torch caches the last two on disk (Inductor's FX-graph cache, the AOTAutograd cache, the built
kernels) keyed by graph, shapes, torch version and config, but in a temporary folder
(`/tmp/torchinductor_<user>`) that a reboot or a tmp cleaner empties. `use_persistent_compile_cache`
points those caches at `cache_dir() / "torch-compile"`, so a second `mgtq generate --compile` on the
same model and shapes loads the compiled code instead of building it; only Dynamo's tracing of each
distinct block is paid again. Nothing is written into the repository or the install folder. The
folder's name carries a digest of mgtq's custom-op schemas (`ops_digest`), which torch's keys miss.

Where: `$MGTQ_CACHE_DIR`, else `$XDG_CACHE_HOME/mgtq`, else `~/.cache/mgtq` (on Windows `%LOCALAPPDATA%\\mgtq`).
A `TORCHINDUCTOR_CACHE_DIR` the user set wins over all of them (torch's own knob keeps its meaning).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mgtq.files import atomic_file, writer_alive

CACHE_ENV = "MGTQ_CACHE_DIR"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
_WINDOWS = os.name == "nt"

__all__ = ["CACHE_ENV", "CacheEntry", "PrecompiledBlocks", "cache_dir", "cache_entries", "clear_cache",
           "compile_cache_dir", "inductor_cache_for_builds", "ops_digest", "precompile_supported", "source_digest",
           "use_persistent_compile_cache"]


def cache_dir() -> Path:
    """mgtq's user cache folder (not created here): $MGTQ_CACHE_DIR, $XDG_CACHE_HOME/mgtq, else where the system
    keeps a user's caches: %LOCALAPPDATA%\\mgtq on Windows, ~/.cache/mgtq elsewhere."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "mgtq"
    local = os.environ.get("LOCALAPPDATA") if _WINDOWS else None  # where Windows programs keep caches (not roamed)
    return Path(local) / "mgtq" if local else Path.home() / ".cache" / "mgtq"


def compile_cache_dir() -> Path:
    """Where torch.compile's caches go: one folder per torch version and per set of mgtq op schemas."""
    return cache_dir() / "torch-compile" / f"torch-{torch.__version__}-ops-{ops_digest()}"


def ops_digest(namespace: str = "mgtq") -> str:
    """12 hex digits of the schemas of the custom ops in `namespace` (mgtq's: once its kernels are imported).

    Inductor's cache keys cover the traced graph, not the schemas of the custom ops it calls: code
    compiled before an op's argument was renamed would be loaded and call the op with the old name.
    """
    import mgtq.quantization.kernels  # noqa: F401  (registers mgtq's ops)

    prefix = f"{namespace}::"
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))
    schemas = "\n".join(str(torch._C._get_schema(name, "")) for name in names)
    return hashlib.sha256(schemas.encode()).hexdigest()[:12]


def _user_set_inductor_dir() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR if the user set it (torch itself writes its temp default there on first use)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    value = os.environ.get(INDUCTOR_CACHE_ENV)
    if not value or os.path.abspath(value) == os.path.abspath(default_cache_dir()):
        return None
    return value


def use_persistent_compile_cache() -> Path:
    """Send torch.compile's on-disk caches to `compile_cache_dir()` for this process; the folder used.

    Call before the first compiled forward (compiling is lazy: `compile_blocks` calls this). Turns on
    the FX-graph and AOTAutograd caches (torch's defaults, set here in case a config turned them off).
    """
    import torch._functorch.config
    import torch._inductor.config

    user = _user_set_inductor_dir()
    folder = Path(user) if user else compile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the compile cache folder {folder} ({err.strerror}); set {CACHE_ENV} to a "
                      "writable folder") from None
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)
    if not user:
        _mark_used(folder)
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return folder


@contextlib.contextmanager
def inductor_cache_for_builds():
    """Inductor's cache folder at `compile_cache_dir()` while the block runs, then as it was.

    For C++ that mgtq builds through Inductor outside a compiled forward (`mgtq.native.amx`): in the default
    folder in tmp, a reboot or a tmp cleaner would make every eager process after it build again; pointing
    the whole process there (`use_persistent_compile_cache`) would move the caches of a user's own
    torch.compile calls too. A TORCHINDUCTOR_CACHE_DIR the user set is kept, and so is tmp where mgtq's
    folder cannot be made (a read-only home still builds).
    """
    if _user_set_inductor_dir():
        yield
        return
    folder = compile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield
        return
    _mark_used(folder)
    before = os.environ.get(INDUCTOR_CACHE_ENV)
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(INDUCTOR_CACHE_ENV, None)
        else:
            os.environ[INDUCTOR_CACHE_ENV] = before


# ------------------------------------------------------------------------------------------- cache folders
# Every torch version, set of mgtq ops and (for precompiled blocks) mgtq release or setting makes new folders,
# and the old ones are never read again: `mgtq cache` lists them and removes those unused for a while. A
# folder's mtime says when a process last used it (renewed on use: reading does not change it by itself).
@dataclass(frozen=True)
class CacheEntry:
    """One folder of the compile cache: torch.compile's own caches for one torch version and set of mgtq op
    schemas ("inductor", the precompiled blocks inside it not counted), or the precompiled blocks of one set
    of settings ("precompiled"); "half-removed" in what `clear_cache` returns: a folder a killed `clear_cache`
    left. size in bytes; last_used in seconds since the epoch."""

    path: Path
    kind: str
    size: int
    last_used: float


def _mark_used(folder: Path) -> None:
    try:
        os.utime(folder)
    except OSError:  # a read-only cache still serves; it only cannot say it was used
        pass


def _folder_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def _folders(parent: Path) -> list[Path]:
    """The cache's folders in `parent`, sorted; hidden ones are not: a `.NAME.removing-PID` that `clear_cache`
    was removing when it was killed is no cache a run uses (`clear_cache` removes it)."""
    return sorted(p for p in parent.glob("*") if p.is_dir() and not p.name.startswith("."))


def _torch_folders(root: Path | None) -> Path:
    """The folder holding one torch folder per torch version and op set, under `root` (default `cache_dir()`)."""
    return (cache_dir() if root is None else Path(root)) / "torch-compile"


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """The folders of mgtq's compile cache under `root` (default `cache_dir()`), precompiled ones first
    within each torch folder. A TORCHINDUCTOR_CACHE_DIR of the user's own is not mgtq's and not listed."""
    base = _torch_folders(root)
    entries = []
    for inductor in _folders(base):
        children = _folders(inductor / PRECOMPILED_FOLDER)
        sizes = [_folder_size(p) for p in children]
        entries += [CacheEntry(p, "precompiled", size, p.stat().st_mtime) for p, size in zip(children, sizes)]
        entries.append(CacheEntry(inductor, "inductor", _folder_size(inductor) - sum(sizes), inductor.stat().st_mtime))
    return entries


def clear_cache(unused_days: float | None = None, root: Path | None = None) -> list[CacheEntry]:
    """Remove the compile cache's folders that no process used for `unused_days` days (all with None); the
    removed entries. Always safe: a later compile builds what it needs again. A torch folder takes its
    precompiled blocks with it (each use of those renews it too). What an earlier, killed call left half
    removed goes too, whatever `unused_days` says (no run uses it), unless that call is still running."""
    if unused_days is not None and unused_days < 0:
        raise ValueError(f"unused_days must be ≥ 0, got {unused_days}")
    cutoff = None if unused_days is None else time.time() - unused_days * 86400
    removed = []
    for entry in cache_entries(root):
        if entry.path.exists() and (cutoff is None or entry.last_used < cutoff):
            # renamed first: a process starting meanwhile never finds a half-removed folder under the live name
            doomed = entry.path.with_name(f".{entry.path.name}.removing-{os.getpid()}")
            os.replace(entry.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(entry)
    for entry in _half_removed(root):  # whatever their age: no run uses them
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry)
    return removed


_HALF_REMOVED = re.compile(r"\..+\.removing-(\d+)")


def _half_removed(root: Path | None) -> list[CacheEntry]:
    """The `.NAME.removing-PID` folders (torch folders, and precompiled ones inside them) whose `clear_cache`
    was killed before it finished: those of a pid that no longer runs (a live one is removing it now)."""
    base = _torch_folders(root)
    parents = [base] + [inductor / PRECOMPILED_FOLDER for inductor in _folders(base)]
    found = []
    for parent in parents:
        for path in sorted(parent.glob(".*")):
            match = _HALF_REMOVED.fullmatch(path.name)
            if match and path.is_dir() and not writer_alive(int(match[1])):
                found.append(CacheEntry(path, "half-removed", _folder_size(path), path.stat().st_mtime))
    return found


# ---------------------------------------------------------------------------------------- precompiled blocks
# The caches above keep Inductor's and AOTAutograd's output, but every process still runs Dynamo over each
# distinct block (about 0.8 s a block on a 2-core Zen 4): a SCQ model, whose blocks each mix W4A8 and W4A16
# layers differently, has 37 distinct blocks at meissonic-1024. torch's ahead-of-time compile
# (`torch.compile(...).aot_compile`, `AOTCompiledFunction`) serializes Dynamo's output too: the rewritten
# bytecode, the guards and the compiled graph. Loading one takes a tenth of a second and no tracing. It is
# experimental in torch, so everything here falls back to plain torch.compile when it is unavailable or fails;
# a torch without the API the store uses (`precompile_supported`) never builds a store at all.
PRECOMPILED_FOLDER = "mgtq-precompiled"
PRECOMPILED_MAGIC = b"mgtq-precompiled-v1\n"
PRECOMPILED_PER_GROUP = 8  # artifacts kept for one block structure and input signature (guards pick one)
_PRECOMPILE_OPTIONS = {"mode", "options"}  # torch.compile kwargs the store keys on; others: plain torch.compile


@functools.lru_cache(maxsize=None)
def precompile_supported() -> bool:
    """Whether this torch has the ahead-of-time compile API the store is written against, decided once.

    `torch._dynamo.aot_compile` came in torch 2.9, but in 2.9 and 2.10 `serialize` returns bare bytes of an
    earlier format (2.9 lacks `disable_guard_check` too); the store is written for the `AOTCompileSaveResult`
    that `serialize` returns from 2.11. Checked by name, not version: without it `compile_blocks` uses plain
    torch.compile and says nothing (the same results; only a later process's warm start is lost)."""
    try:
        from torch._dynamo import aot_compile
    except ImportError:  # torch < 2.9
        return False
    function = getattr(aot_compile, "AOTCompiledFunction", None)
    methods = ("serialize", "deserialize", "guard_check", "disable_guard_check")
    return (hasattr(aot_compile, "AOTCompileSaveResult") and hasattr(torch._dynamo.config, "enable_aot_compile")
            and function is not None and all(hasattr(function, name) for name in methods))


class _Ineligible(Exception):
    """A call the precompiled path does not serve (it runs through plain torch.compile)."""


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """12 hex digits of mgtq's Python sources: a traced block inlines mgtq code, and its guards do not cover it."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _settings_key(compile_kwargs: dict) -> str:
    """What the serialized guards leave out (torch drops guards on globals): versions, mgtq's sources and
    kernel settings (MGTQ_* variables such as MGTQ_CPU_CLASS), threads, the torch.compile options."""
    import platform
    import sys

    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("MGTQ_") and k != CACHE_ENV)
    facts = (torch.__version__, sys.version_info[:3], platform.machine(), source_digest(), ops_digest(), env,
             torch.get_num_threads(), sorted((k, repr(v)) for k, v in compile_kwargs.items()))
    return hashlib.sha256(repr(facts).encode()).hexdigest()[:16]


def _signature(value, any_size: bool = False, hooked: bool = False):
    """A hashable description of a call argument: tensor metadata, plain values, the block tokens of token
    hooks that declare themselves precompilable (mgtq.models.hooks); anything else is ineligible (other
    objects: their guards may not serialize). any_size: tensors without their sizes (a dynamic-shape call).
    hooked: inside block tokens, whose dicts and lists are written into (their contents are left to guards)."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise _Ineligible
        shape = (value.dim(),) if any_size else (tuple(value.shape), value.stride())
        return ("T", *shape, str(value.dtype), str(value.device), value.is_inference())
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, tuple) or (isinstance(value, list) and not hooked):
        return (type(value).__name__, tuple(_signature(v, any_size, hooked) for v in value))
    if hooked and isinstance(value, (list, dict)):
        return (type(value).__name__,)
    if getattr(type(value), "precompilable", False) is True:
        return ("tokens", f"{type(value).__module__}.{type(value).__qualname__}",
                tuple(sorted((k, _signature(v, any_size, True)) for k, v in vars(value).items())))
    raise _Ineligible


def _varying_tokens(value) -> bool:
    """Whether a call argument holds block tokens whose token count changes from call to call (also inside
    other block tokens: a full step of context reuse recording around TomeMGT's merge)."""
    if isinstance(value, (tuple, list)):
        return any(_varying_tokens(v) for v in value)
    if getattr(type(value), "varying_tokens", False) is True:
        return True
    return getattr(type(value), "precompilable", False) is True and any(_varying_tokens(v) for v in vars(value).values())


def _has_hooks(module: torch.nn.Module) -> bool:
    from torch.nn.modules import module as nn_module

    forward = module.__dict__.get("forward")  # accelerate wraps it there; removing its hook puts back the original
    wrapped = forward is not None and not (getattr(forward, "__func__", None) is type(module).forward
                                           and getattr(forward, "__self__", None) is module)
    return bool(module._forward_hooks or module._forward_pre_hooks or wrapped
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def _structure(module: torch.nn.Module) -> tuple:
    """Every submodule's name and class (SCQ blocks differ here: W4A8 or W4A16 layers) and its own tensors'
    dtypes and shapes: one group per kind of block, whose guards then only confirm it."""
    for m in module.modules():
        if any(isinstance(v, torch.Tensor) and v.is_mkldnn for v in vars(m).values()):
            # oneDNN-prepacked tensors (W4A8's opt-in weight cache) have no fake-tensor form to trace ahead of time
            raise _Ineligible
        if _has_hooks(m):  # e.g. accelerate's sequential offload wraps every leaf's forward: not saved code
            raise _Ineligible
    return tuple((name, f"{type(m).__module__}.{type(m).__qualname__}",
                  tuple((n, str(t.dtype), tuple(t.shape)) for n, t in [*m.named_parameters(recurse=False),
                                                                      *m.named_buffers(recurse=False)]))
                 for name, m in module.named_modules())


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:  # a failed write (a full disk) leaves no partial file behind
        Path(tmp).write_bytes(data)


class PrecompiledBlocks:
    """Ahead-of-time compiled forwards of blocks, kept in `folder` and shared by the blocks of one model.

    A block call is served by a saved function whose guards accept this block and these arguments; the
    first call of a new structure or input signature compiles one (Dynamo + Inductor, as torch.compile
    would) and saves it, so a later process only loads. Token hooks' block tokens that declare themselves
    `precompilable` (context reuse's full and local steps and TomeMGT's merges, mgtq.models.hooks) are served
    too; those with `varying_tokens` (local steps; merges, whose merged count changes with the step) are
    compiled with dynamic shapes, one function for every token count. Calls it does not serve
    (grad enabled, module hooks, arguments that are not tensors, plain values or precompilable block tokens,
    such as a user's own hook) go to the block's plain torch.compile.
    Each file carries a SHA-256 of its bytes: a damaged one is removed with a warning and compiled again.
    """

    def __init__(self, folder: Path, compile_kwargs: dict):
        self.folder = Path(folder) / PRECOMPILED_FOLDER / _settings_key(compile_kwargs)
        if self.folder.is_dir():
            _mark_used(self.folder)
        self.compile_kwargs = dict(compile_kwargs)
        self.counts = {"loaded": 0, "compiled": 0, "calls": 0, "fallback_calls": 0}
        self.disabled: str | None = None  # why the store serves no call any more
        self.failure: str | None = None  # the last ahead-of-time compile's error, until plain torch.compile runs
        self._groups: dict[str, list] = {}
        self._devices: dict[str, str] = {}
        self._memo: dict[int, tuple] = {}  # id(block) -> (signature, group key, function or None: not served)

    def __deepcopy__(self, memo):
        return self  # a cache of compiled code, shared by copies of the model (its functions do not pickle)

    def __reduce__(self):
        return _none, ()  # torch.save(model) pickles a model uncompiled (nn.Module drops _compiled_call_impl)

    @staticmethod
    def supports(compile_kwargs: dict) -> bool:
        """Whether torch.compile with these kwargs can be precompiled here (Inductor; mode and options only; a
        torch with the API the store uses, `precompile_supported`)."""
        backend = compile_kwargs.get("backend", "inductor")
        return (backend == "inductor" and set(compile_kwargs) - {"backend"} <= _PRECOMPILE_OPTIONS
                and precompile_supported())

    def install(self, block: torch.nn.Module) -> None:
        """Route `block`'s calls through the store; `block.compile(...)` must have run (the fallback)."""
        fallback = block._compiled_call_impl
        if fallback is None:
            raise RuntimeError("call block.compile(...) before PrecompiledBlocks.install(block)")
        block._compiled_call_impl = _PrecompiledCall(block, self, fallback)

    def function_for(self, block: torch.nn.Module, args: tuple, kwargs: dict):
        """The saved function that runs `block(*args, **kwargs)`, compiled now if none fits; None: fall back."""
        if self.disabled is not None or torch.is_grad_enabled():
            return None
        if _has_hooks(block):
            return None
        call = (args, tuple(sorted(kwargs.items())))
        dynamic = _varying_tokens(call)  # a local step of context reuse: compiled once for every token count
        try:
            signature = _signature(call, any_size=dynamic)
        except _Ineligible:
            return None
        memo = self._memo.get(id(block))
        if memo is not None and memo[0] == signature:
            if memo[2] is None or _guards_pass(memo[2], block, args, kwargs):
                return memo[2]
        try:
            key = self._group_key(block, (dynamic, signature), args)
        except _Ineligible:
            self._memo[id(block)] = (signature, None, None)
            return None
        group = self._load_group(key)
        fn = next((f for f in group if _guards_pass(f, block, args, kwargs)), None)
        if fn is None:
            if len(group) >= PRECOMPILED_PER_GROUP:
                return None
            fn = self._compile(block, args, kwargs, key, dynamic)
            if fn is None:
                return None
            group.append(fn)
        self._memo[id(block)] = (signature, key, fn)
        return fn

    def _group_key(self, block, signature, args) -> str:
        device = next((t.device.type for t in _tensors(args)), "cpu")
        if device not in self._devices:
            from mgtq.quantization.kernels import describe_kernels

            self._devices[device] = repr(sorted(describe_kernels(device).items()))
        # Saved guards check tensors' dispatch keys against the inference mode they are loaded in: a group is
        # saved and loaded in one mode (the sampler runs in inference mode, the pipelines' callers in no_grad).
        facts = (type(block).__qualname__, _structure(block), signature, self._devices[device],
                 torch.is_inference_mode_enabled())
        return hashlib.sha256(repr(facts).encode()).hexdigest()[:24]

    def _load_group(self, key: str) -> list:
        if key in self._groups:
            return self._groups[key]
        from torch._dynamo.aot_compile import AOTCompiledFunction

        group = self._groups[key] = []
        for path in sorted((self.folder / key).glob("*.bin")):
            payload = _read_checked(path)
            if payload is None:
                continue
            try:
                fn = AOTCompiledFunction.deserialize(payload)
            except Exception as err:  # noqa: BLE001 (a file of another torch build, say): compile it again
                _warn_once(f"cannot load the precompiled block {path.name} ({type(err).__name__}: {err}); "
                           "compiling it again")
                path.unlink(missing_ok=True)
                continue
            fn.disable_guard_check()  # function_for checks the guards once per call itself
            group.append(fn)
            self.counts["loaded"] += 1
        return group

    def _compile(self, block, args, kwargs, key, dynamic: bool = False):
        from torch._dynamo.aot_compile import AOTCompiledFunction
        from torch.fx.experimental import _config as shape_config

        # Dynamic shapes: plain torch.compile would recompile such a block for the second token count it sees
        # and mark the count dynamic; an ahead-of-time compile traces once, so it is told up front. Floats are
        # specialised: with dynamic shapes Dynamo otherwise turns float scalars into tensors by restarting its
        # trace, which the ahead-of-time compile does not support. No duck sizing: a token count that happens
        # to equal another size (the head dim, say) would otherwise be guarded equal to it for good.
        patches = {"enable_aot_compile": True, **({"specialize_float": True} if dynamic else {})}
        if dynamic:  # dynamic=True covers the arguments; tensors held by block tokens are static unless marked
            for t in _hook_tensors((args, tuple(kwargs.values()))):
                for dim in range(t.dim()):
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        try:
            with torch._dynamo.config.patch(**patches), shape_config.patch(use_duck_shape=not dynamic):
                compiled = torch.compile(block.forward, fullgraph=True, **self.compile_kwargs,
                                         **({"dynamic": True} if dynamic else {}))
                fn = compiled.aot_compile((args, kwargs))
            payload = AOTCompiledFunction.serialize(fn).serialized_data
            fn.disable_guard_check()  # function_for checks the guards once per call itself
        except Exception as err:  # noqa: BLE001 (experimental in torch): _PrecompiledCall decides, see there
            self.failure = f"{type(err).__name__}: {err}"
            return None
        try:
            folder = self.folder / key
            folder.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256(payload).hexdigest()
            _write_atomic(folder / f"{digest[:16]}.bin", PRECOMPILED_MAGIC + digest.encode() + b"\n" + payload)
        except OSError as err:
            _warn_once(f"cannot save a precompiled block in {self.folder} ({err.strerror}); it stays in memory")
        self.counts["compiled"] += 1
        return fn


def compile_in_place(module: torch.nn.Module, **kwargs) -> None:
    """`module.compile(fullgraph=True, **kwargs)` that still runs once hooks come (`HookAwareCompile`)."""
    module._compiled_call_impl = HookAwareCompile(module, kwargs)


class HookAwareCompile:
    """A module's `_compiled_call_impl` (what `nn.Module.compile` sets) that traces its call in one graph
    (fullgraph: mgtq's blocks have none to break, so a break is an error to hear of) while no submodule carries a
    hook, and without fullgraph while one does: accelerate's sequential offload and diffusers' layerwise casting
    wrap forwards in code Dynamo cannot put in a graph (a `torch.compiler.disable`d weight load, a Parameter
    built), and the graph breaks around it. Offload may be enabled after compile, so it is decided per call."""

    def __init__(self, module: torch.nn.Module, kwargs: dict):
        self.module, self.kwargs = module, dict(kwargs)
        self._compiled: dict[bool, object] = {}  # fullgraph -> torch.compile(module._call_impl), built on first use

    def __call__(self, *args, **kwargs):
        if _TOOLCHAIN["failure"] is not None:
            return self.module._call_impl(*args, **kwargs)
        whole = not any(_has_hooks(m) for m in self.module.modules())
        fn = self._compiled.get(whole)
        if fn is None:
            fn = self._compiled[whole] = torch.compile(self.module._call_impl, **{"fullgraph": whole, **self.kwargs})
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (only a toolchain failure is handled; anything else is raised)
            if not note_toolchain_failure(err):
                raise
        return self.module._call_impl(*args, **kwargs)


# Set once torch.compile has failed for want of a toolchain: everything mgtq compiles then runs eager (each would fail
# the same way, and a failed build can take seconds).
_TOOLCHAIN: dict[str, str | None] = {"failure": None}


def toolchain_failure() -> str | None:
    """Why torch.compile could not build code in this process (then what mgtq compiles runs eager), or None."""
    return _TOOLCHAIN["failure"]


def note_toolchain_failure(err: BaseException) -> bool:
    """Whether `err` says torch.compile cannot build code here; if so it is recorded and said once, with what to
    install, and from then on mgtq's compiled blocks and fused kernels run eager."""
    cause = _toolchain_cause(err)
    if cause is None:
        return False
    if _TOOLCHAIN["failure"] is None:
        _TOOLCHAIN["failure"] = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"
        warnings.warn(f"torch.compile cannot build code on this machine ({_TOOLCHAIN['failure']}); mgtq runs eager "
                      "instead: the same results, not faster. To compile: on Windows, run from Visual Studio's 'x64 "
                      "Native Tools' prompt (MSVC); on macOS, `xcode-select --install` and `brew install libomp`; on "
                      "Linux, install g++; on a CUDA GPU, Triton must be installed and support the GPU (none on "
                      "Windows: use WSL2).", RuntimeWarning, stacklevel=3)
    return True


def _toolchain_cause(err: BaseException) -> BaseException | None:
    """The exception in `err`'s chain that says torch could not build compiled code at all: no C++ compiler
    (Windows outside a Visual Studio prompt, slim images), a compiler that cannot build Inductor's code (macOS
    without OpenMP), no Triton for the GPU (CUDA on Windows, GPUs Triton does not support). Inductor wraps them."""
    from torch._inductor import exc

    kinds = (exc.InvalidCxxCompiler, exc.CppCompileError, exc.TritonMissing)
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return err
        seen.add(id(err))
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return None


class _PrecompiledCall:
    """A block's `_compiled_call_impl`: the store's function where it serves the call, else plain torch.compile."""

    def __init__(self, block: torch.nn.Module, store: PrecompiledBlocks, fallback):
        self.block, self.store, self.fallback = block, store, fallback

    def __call__(self, *args, **kwargs):
        if _TOOLCHAIN["failure"] is not None:  # nothing can be compiled here: the fallback runs eager
            return self.fallback(*args, **kwargs)
        store = self.store
        fn = store.function_for(self.block, args, kwargs)
        if fn is not None:
            store.counts["calls"] += 1
            return fn(self.block, *args, **kwargs)
        store.counts["fallback_calls"] += 1
        failure, store.failure = store.failure, None
        out = self.fallback(*args, **kwargs)  # an error of the call itself (bad inputs) is raised here, as before
        if failure is not None:  # plain torch.compile ran what the ahead-of-time compile could not: a limit of
            store.disabled = failure  # the latter, so plain torch.compile from now on
            if _TOOLCHAIN["failure"] is None:  # (no toolchain at all was said once, with what to do)
                _warn_once(f"torch's ahead-of-time compile failed ({failure}); compiling blocks with plain "
                           "torch.compile (no precompiled warm start)")
        return out


def _none():
    return None


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _hook_tensors(value, inside: bool = False):
    """The tensors that block tokens (objects with `precompilable`) hold, however nested."""
    if isinstance(value, torch.Tensor):
        if inside:
            yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _hook_tensors(v, inside)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _hook_tensors(v, inside)
    elif getattr(type(value), "precompilable", False) is True:
        for v in vars(value).values():
            yield from _hook_tensors(v, True)


def _guards_pass(fn, block, args, kwargs) -> bool:
    try:
        return bool(fn.guard_check(block, *args, **kwargs))
    except Exception:  # noqa: BLE001 (a guard that cannot even be evaluated on this block does not hold)
        return False


def _read_checked(path: Path) -> bytes | None:
    """A saved function's bytes if the file is whole and unaltered; else None (the file is removed, warned)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head, _, rest = data.partition(b"\n")
    digest, _, payload = rest.partition(b"\n")
    if head + b"\n" == PRECOMPILED_MAGIC and hashlib.sha256(payload).hexdigest().encode() == digest:
        return payload
    _warn_once(f"the precompiled block {path} is damaged (its checksum does not match); removed, compiling it again")
    path.unlink(missing_ok=True)
    return None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
