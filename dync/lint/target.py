"""What the stages are linted for: the TensorRT version a build targets, the build's precision, its plugin mode.

`dync build` hands TensorRT each stage in a form that depends on all three (`dync.build.forms`): `dync::`
nodes kept as AOT plugins or decomposed, the float32 stage converted to fp16, or the Q/DQ stage `dync quantize`
wrote. The lint checks that form, so it resolves the three the way the build does (`dync.build.targets`).
Without a version the lint keeps its original behaviour: the facts' own TensorRT, dync ops with a TensorRT face
kept as plugins.
"""

from __future__ import annotations

from dataclasses import dataclass

from dync.build.targets import MIN_TENSORRT, TensorRTVersion, check_build_precision, check_plugin_mode, plugin_mode


@dataclass(frozen=True)
class LintTarget:
    """The TensorRT (None: none named), the precision (None: the stages as the package holds them) and the
    plugin mode (aot or decomposed) a lint checks the stages for."""

    tensorrt: TensorRTVersion | None = None
    precision: str | None = None
    plugins: str = "aot"

    @property
    def supported(self) -> bool:
        """Whether dync builds for this TensorRT at all (no version named counts as yes)."""
        return self.tensorrt is None or self.tensorrt.major_minor >= MIN_TENSORRT


def lint_target(tensorrt_version: str | None = None, precision: str | None = None,
                plugins: str | None = None) -> LintTarget:
    """The target as `dync build` would resolve it; an unknown precision or plugin mode, a version string that
    is not one, or aot plugins asked of a TensorRT without them is an InputError, as it is for the build."""
    check_build_precision(precision)
    check_plugin_mode(plugins)
    if tensorrt_version is None:
        return LintTarget(None, precision, plugins or "aot")
    version = TensorRTVersion.parse(tensorrt_version)
    target = LintTarget(version, precision, plugins or "decomposed")
    if not target.supported:  # linted as one error (`dync.lint.versions.unsupported_version`), not refused here
        return target
    return LintTarget(version, precision, plugin_mode(version, plugins))
