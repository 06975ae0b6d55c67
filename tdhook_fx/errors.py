"""The errors tdhook_fx raises for a user's mistake, rendered like a compiler's diagnostics.

Every error a user can cause derives from `TdhookFxError`. Errors that point into a program
carry `Diagnostic`s (a span, a message, hints) and print as::

    program:3:7: unknown module path 'transformer.h[12].mlp'
      3 | save transformer.h[12].mlp
        |      ^^^^^^^^^^^^^^^^^^^^^
      hint: did you mean 'transformer.h[1].mlp'?
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A place in the program text: 1-based line and column, end exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int


@dataclass(frozen=True)
class Diagnostic:
    """One located problem: where, what, and how to fix it."""

    span: Span | None
    message: str
    hints: tuple[str, ...] = field(default=())
    expected: str | None = None

    def render(self, text: str | None, source: str = "program") -> str:
        if self.span is None:
            return f"{source}: {self.message}" + "".join(f"\n  hint: {h}" for h in self.hints)
        span = self.span
        lines = [f"{source}:{span.line}:{span.column}: {self.message}"]
        source_lines = (text or "").split("\n")
        if 1 <= span.line <= len(source_lines):
            line_text = source_lines[span.line - 1].rstrip("\r")
            gutter = str(span.line)
            end = span.end_column if span.end_line == span.line else len(line_text) + 1
            width = max(1, end - span.column)
            lines.append(f"  {gutter} | {line_text}")
            lines.append(f"  {' ' * len(gutter)} | {' ' * (span.column - 1)}{'^' * width}")
        if self.expected:
            lines.append(f"  expected: {self.expected}")
        lines.extend(f"  hint: {hint}" for hint in self.hints)
        return "\n".join(lines)


class TdhookFxError(Exception):
    """Base of every error tdhook_fx raises for a user's mistake.

    Where tdhook (or Python) raised a builtin error for the same mistake, the class also derives
    from that builtin (`MissingInputKey` is a `KeyError`), so `except KeyError` code keeps working.
    """


class _ProgramError(TdhookFxError):
    """An error made of located diagnostics in one program text."""

    def __init__(self, diagnostics: list[Diagnostic], text: str | None, source: str = "program"):
        self.diagnostics = sorted(
            diagnostics, key=lambda d: (d.span.line, d.span.column) if d.span else (0, 0)
        )
        self.text = text
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        parts = [d.render(self.text, self.source) for d in self.diagnostics]
        if len(parts) > 1:
            parts.append(f"{len(parts)} errors")
        return "\n".join(parts)


class DslSyntaxError(_ProgramError):
    """The program text does not follow the DSL's grammar.

    `.line` and `.column` (1-based) locate the problem; `.expected` lists, in words, what
    could have come there (None where the grammar was not the problem).
    """

    def __init__(self, diagnostic: Diagnostic, text: str, source: str = "program"):
        self.expected = diagnostic.expected
        super().__init__([diagnostic], text, source)
        self.line = diagnostic.span.line
        self.column = diagnostic.span.column


class ResolutionError(_ProgramError):
    """The program is well formed but does not fit the model (all problems, sorted)."""


class CaptureError(TdhookFxError):
    """Neither front end could turn the model into a graph (which failed, why, what to try)."""


class StoredGraphInvalid(TdhookFxError):
    """A stored capture (the persistent capture cache) is damaged or refused by its allow-list;
    never shown: the model is captured anew."""


class InputShapeError(TdhookFxError, ValueError):
    """The inputs break a shape rule of an exported graph (a size bounded or tied to another)."""


class BindingError(TdhookFxError):
    """A runtime value (`$name`) is missing or does not fit its site at call time."""


class LayoutWarning(TdhookFxError, UserWarning):
    """A runtime value broadcasts by torch's rules in a way that is probably not what was meant
    (its first size is the batch size, but it lines up with the site's last dimensions)."""


class ExportError(TdhookFxError):
    """A compiled module could not be saved, exported or loaded."""


class FileFormatError(ExportError):
    """A value read from a file is not what tdhook_fx writes there: `.where` (a path into the
    file's JSON, e.g. `graph_module.graph.nodes[3].target`) and `.message` (what is wrong)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


class CodeInFile(FileFormatError):
    """A string in a file that torch would run as code, outside the grammar tdhook_fx accepts."""


class PickleInFile(FileFormatError):
    """A part of a file that torch would unpickle."""


class UnknownModulePath(TdhookFxError, ValueError):
    """A tdhook module path or key pattern names no module of the model."""


class MissingInputKey(TdhookFxError, KeyError):
    """The input TensorDict lacks a key that a method or module reads."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class MethodUsageError(TdhookFxError, RuntimeError):
    """A method was used in a way it does not support (outside its context, twice, ...)."""


class InvalidArgument(TdhookFxError, ValueError):
    """A value given to tdhook_fx (an argument, a callback's result, data) does not fit."""


class InvalidPattern(TdhookFxError, ValueError):
    """A regular expression (a `/regex/` selector, a tdhook key pattern) is malformed or cannot be
    matched in linear time (see `tdhook_fx.syntax.regex`). `.reason` says why, `.hints` what to do."""

    def __init__(self, reason: str, *hints: str):
        super().__init__(reason + "".join(f"\n  hint: {hint}" for hint in hints))
        self.reason = reason
        self.hints = hints


class InvalidArgumentType(TdhookFxError, TypeError):
    """A value given to tdhook_fx has the wrong type."""


class PatchShapeError(InvalidArgument):
    """A `patch_fn` returned a tensor whose shape differs from the activation it replaces."""


class ProbingError(InvalidArgument):
    """A probe was stepped without a valid `step_type`, or results would be overwritten."""


class CommandLineError(TdhookFxError):
    """A mistake on the command line (unknown model, missing file, bad --set)."""


class GenerationError(TdhookFxError, ValueError):
    """Text generation cannot run as asked (a model without a KV cache, an unsupported option or statement)."""


class ReplacementShapeError(TdhookFxError, RuntimeError):
    """A replacement value does not fit the units a target selects (tdhook's assignment raised RuntimeError)."""


class WorkflowHandoffError(TdhookFxError, RuntimeError):
    """A workflow cannot keep the shared or consolidated storage of the TensorDict it was given."""
