"""Running these Triton kernels on CPU under the Triton interpreter (tests, smoke benchmarks, CPU engine tests).

Also fixes the interpreter's bf16 ``tl.dot`` (see :func:`_patch_interpreter_bf16_dot`).

``TRITON_INTERPRET=1`` is read when ``@triton.jit`` decorates a function. That holds for our kernels, which
:func:`import_interpreted` imports with the variable set (and restores the environment right after, so that vLLM
and anything imported later see the process's normal environment), but also for Triton's own library functions
(``tl.sum``, ``tl.max``, ``tl.cdiv``, ...), decorated when ``triton.language`` was first imported. When that
happened without the variable (e.g. vLLM imported triton first), calling them from an interpreted kernel raises
"Cannot call @triton.jit'd outside of the scope of a kernel"; :func:`import_interpreted` then makes the interpreter
swap interpreted copies in for the duration of each interpreted kernel call only. It also stops the interpreter
from leaving ``triton.language`` patched after a kernel that calls helper functions.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import numpy as np


def _install_interpreter_patches() -> None:
    """Wrap the interpreter's ``_patch_lang`` (triton 3.9), which swaps interpreter versions of ``triton.language``
    in while a kernel runs: the grid executor undoes its swaps afterwards, but a device-function call (a jitted
    helper, ``tl.sum``, ...) swaps again and never undoes it, leaving ``triton.language`` patched for the rest of
    the process (then compiling any kernel for a GPU fails). Here the swaps of nested calls join the running
    kernel's, so all are undone when it ends. Also swaps in interpreted copies of Triton's library functions when
    those were decorated for compilation (see the module docstring)."""
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    if getattr(interpreter._patch_lang, "_headrouter", False):
        return
    original_patch_lang = interpreter._patch_lang
    library_compiled = isinstance(tl.standard.sum, JITFunction)
    # one copy per function: the interpreter's reductions recognise their combine functions by identity
    interpreted: dict[int, interpreter.InterpretedFunction] = {}
    running: list = []  # scope of the kernel being interpreted

    class KernelScope(interpreter._LangPatchScope):
        patched: set[int]  # ids of the language modules patched in this kernel's scope

        def restore(self) -> None:
            super().restore()
            running.remove(self)

    def languages(fn) -> set[int]:  # the modules Triton's ``_patch_lang(fn)`` patches
        return {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}

    def patch_lang(fn):
        patched_here = languages(fn)
        if running and patched_here <= running[-1].patched:
            # a device-function call whose language modules this kernel already patched: patching again changes
            # nothing (patched members are no longer builtins) and took a third of an interpreted engine's time
            return interpreter._LangPatchScope()
        scope = original_patch_lang(fn)
        if library_compiled:
            for module in (tl, tl.standard, tl.math, tl.core):
                for name, member in list(vars(module).items()):
                    if isinstance(member, JITFunction):
                        copy = interpreted.setdefault(id(member), interpreter.InterpretedFunction(member.fn))
                        scope.set_attr(module, name, copy)
        if running:  # a device-function call inside a kernel: undo with the kernel's swaps
            running[-1]._changes.extend(scope._changes)
            running[-1].patched |= patched_here
            return scope
        kernel_scope = KernelScope()
        kernel_scope._changes = scope._changes
        kernel_scope.patched = patched_here
        running.append(kernel_scope)
        return kernel_scope

    patch_lang._headrouter = True
    interpreter._patch_lang = patch_lang


def _patch_interpreter_bf16_dot() -> None:
    """The interpreter's ``tl.dot`` multiplies bf16 operands as their raw uint16 bits (triton 3.9); compiled
    Triton is right. Widen bf16 operands to fp32 first (exact), so that bf16 kernels run right interpreted."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "_bf16_fixed", False):
        return

    def as_float32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return (handle.data.astype(np.uint32) << 16).view(np.float32)
        return handle.data.astype(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            product = np.matmul(as_float32(a), as_float32(b), dtype=d.data.dtype) + d.data
            return interpreter.TensorHandle(product, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._bf16_fixed = True
    interpreter.InterpreterBuilder.create_dot = create_dot


def import_interpreted(*module_names: str) -> list[ModuleType]:
    """Import kernel modules so that their kernels run under the Triton interpreter, on CPU tensors.

    Modules already imported are returned as they are (their kernels were decorated then). The process
    environment is left as it was.
    """
    # Triton itself is imported as the rest of the process sees it (as vLLM would import it); only our kernels
    # are decorated under the interpreter. gluon is imported now as it is imported lazily at the first launch
    # and checks that the library functions match the environment.
    import triton.experimental.gluon  # noqa: F401
    import triton.language  # noqa: F401

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _install_interpreter_patches()
        _patch_interpreter_bf16_dot()
        return [importlib.import_module(name) for name in module_names]
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
