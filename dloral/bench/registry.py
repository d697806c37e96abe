"""The metric registry: one table of every benchmark metric's facts and of how it is built.

In the manner of pyiqa's `create_metric`: a suite names metrics from METRICS and
`build_metrics` builds each once. Each row states what every value of that metric carries
(direction, kind, level, whether it needs GT, print scale), its protocol in words, and its
builder; a built metric's MetricInfo adds the implementation (code, convention, crop, weights,
flow estimator), which the harness stores with every value and uses as the cache key. What
several metrics share is built once per build: one flow estimator for ewarp and tof, one pyiqa
LPIPS for lpips and tlp. A metric that cannot run here (MetricUnavailable) is skipped with its
reason, or raised with `strict`. The implementations (torch, pyiqa, OpenCV) are imported when a
metric is built, so checking a suite's metric names imports none of them.

Temporal metrics and DOVER are keyed `name@protocol` (ewarp@lai2018, tof@tecogan,
dover@overall, ...; PROTOCOL_SOURCES says which published code each follows); `resolve` gives a
bare name its DEFAULT_PROTOCOL. DOVER's three protocols share one loaded model (and one run of
it per output).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dloral.bench.metric import MetricInfo, MetricUnavailable

if TYPE_CHECKING:
    import torch

    from dloral.bench.dover import DoverScorer
    from dloral.bench.flow import FlowEstimator
    from dloral.bench.iqa import IQAMetric

log = logging.getLogger(__name__)

__all__ = [
    "FULLREF_METRICS",
    "DEFAULT_PROTOCOL",
    "METRICS",
    "PROTOCOL_SOURCES",
    "FullRefMetric",
    "MetricInfo",
    "MetricSpec",
    "MetricUnavailable",
    "ScoredMetric",
    "build_metrics",
    "dover_info",
    "ewarp_info",
    "fullref_metric",
    "resolve",
    "tlp_info",
    "tof_info",
]

FR, NR, TEMPORAL = "full_reference", "no_reference", "temporal"


@dataclass
class ScoredMetric:
    """A metric ready to score a clip: fn(out, gt) -> per-frame/pair values (CPU tensor)."""

    info: MetricInfo
    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    device: str
    first: int = 0  # frames of the clip it leaves out at the start (its values begin there)
    min_frames: int = 1  # fewer frames than this: skipped (pairs need 2, TecoGAN's cutfr 6)


class _Shared:
    """What the metrics of one build share, each made at most once: the pyiqa models (LPIPS
    serves lpips and tlp), the flow estimator (ewarp, tof) and DOVER (its three protocols).
    What cannot be made raises the same MetricUnavailable for every metric that asks."""

    def __init__(
        self, device: torch.device, crop_border: int, flow: str, strict: bool, seed: int = 0
    ):
        self.device, self.crop_border, self.strict = device, crop_border, strict
        self.flow_kind, self.seed = flow, seed
        self._made: dict[str, object] = {}

    def _once(self, key: str, make: Callable[[], object]):
        if key not in self._made:
            try:
                self._made[key] = make()
            except MetricUnavailable as err:
                self._made[key] = err
        made = self._made[key]
        if isinstance(made, MetricUnavailable):
            raise made
        return made

    def iqa(self, name: str) -> IQAMetric:
        from dloral.bench.iqa import iqa_metric

        return self._once(name, lambda: iqa_metric(name, device=self.device, strict=self.strict))

    def flow(self) -> FlowEstimator:
        from dloral.bench.flow import load_flow_estimator

        return self._once("flow", lambda: load_flow_estimator(self.flow_kind, self.device))

    def dover(self) -> DoverScorer:
        from dloral.bench.dover import DoverScorer

        return self._once("dover", lambda: DoverScorer.load(None, self.device, self.seed))

    def farneback(self) -> FlowEstimator:
        """OpenCV Farneback with TecoGAN's settings (tof@tecogan), whatever the suite's flow."""
        from dloral.bench.flow import FarnebackFlow

        return self._once("farneback", FarnebackFlow)

    @property
    def flow_name(self) -> str | None:
        """The flow estimator's name, None if none was made."""
        flow = self._made.get("flow")
        return None if flow is None or isinstance(flow, MetricUnavailable) else flow.name

    def flow_device(self, flow: FlowEstimator) -> str:
        return str(self.device) if "raft" in flow.name.lower() else "cpu"


@dataclass(frozen=True)
class MetricSpec:
    """One metric's facts and its builder: build(spec, shared) -> ScoredMetric."""

    name: str
    higher_is_better: bool
    kind: str  # FR | NR | TEMPORAL
    level: str  # "frame" | "pair" | "clip": what one value covers
    needs_gt: bool
    protocol: str  # what the value is, after whom
    build: Callable[[MetricSpec, _Shared], ScoredMetric]
    scale: float = 1.0  # values are printed multiplied by this

    def info(self, implementation: str, **changes) -> MetricInfo:
        """The MetricInfo of a value made by `implementation` (changes: e.g. needs_gt)."""
        facts = ("name", "higher_is_better", "kind", "level", "scale", "needs_gt")
        own = {fact: getattr(self, fact) for fact in facts}
        return MetricInfo(implementation=implementation, **(own | changes))


# ---- full reference: BasicSR's PSNR/SSIM (dloral.bench.fullref) ---------------------------


@dataclass(frozen=True)
class FullRefMetric:
    """A full-reference metric with its MetricInfo; call as metric(out, gt) -> (T,) float64."""

    info: MetricInfo
    crop_border: int
    y_channel: bool
    fn: Callable[..., torch.Tensor]

    def __call__(self, out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return self.fn(out, gt, crop_border=self.crop_border, y_channel=self.y_channel)


def fullref_metric(name: str, crop_border: int = 0) -> FullRefMetric:
    """`psnr`, `ssim` (RGB) or `psnr_y`, `ssim_y` (BT.601 Y), BasicSR convention, given crop."""
    if name not in FULLREF_METRICS:
        raise KeyError(
            f"unknown full-reference metric {name!r}; known: {', '.join(FULLREF_METRICS)}"
        )
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    from dloral.bench import fullref

    y_channel = name.endswith("_y")
    channel = "Y (BT.601, 16-235)" if y_channel else "RGB"
    info = METRICS[name].info(
        f"dloral.bench.fullref (BasicSR): {channel}, uint8, crop {crop_border}, float64"
    )
    fn = fullref.psnr if name.startswith("psnr") else fullref.ssim
    return FullRefMetric(info=info, crop_border=crop_border, y_channel=y_channel, fn=fn)


def _fullref(spec: MetricSpec, shared: _Shared) -> ScoredMetric:
    metric = fullref_metric(spec.name, crop_border=shared.crop_border)
    return ScoredMetric(metric.info, metric, "cpu")


# ---- perceptual and no-reference: pyiqa (dloral.bench.iqa) ---------------------------------


def _pyiqa(spec: MetricSpec, shared: _Shared) -> ScoredMetric:
    metric = shared.iqa(spec.name)
    if metric.info != spec.info(metric.info.implementation):
        raise ValueError(f"{spec.name}: pyiqa's metric {metric.info} disagrees with {spec}")
    return ScoredMetric(metric.info, metric, str(shared.device))


def _pyiqa_fullref(spec: MetricSpec, shared: _Shared) -> ScoredMetric:
    """pyiqa's own PSNR/SSIM conventions, as papers that score with pyiqa's defaults print
    them (DOVE's eval_metrics.py: pyiqa.create_metric('ssim'), no crop); never cropped."""
    if shared.crop_border:
        raise MetricUnavailable(
            f"{spec.name}: pyiqa's convention crops nothing, and [options] crop_border = "
            f"{shared.crop_border}; use ssim_y / psnr_y (BasicSR, cropped) or crop_border = 0"
        )
    return _pyiqa(spec, shared)


# ---- temporal (dloral.bench.temporal) and DOVER (dloral.bench.dover): name@protocol --------

# A temporal metric is a name plus a protocol: the published code whose numbers it reproduces.
# A bare name in a suite means its default protocol, the one peers' papers use.
DEFAULT_PROTOCOL = {"ewarp": "evalcrafter", "tof": "tecogan", "tlp": "tecogan", "dover": "overall"}
_DOVER_FUSION = (
    "VQAssessment/DOVER evaluate_a_set_of_videos.py fuse_results (evaluate_one_video.py's "
    "normalisation and view decomposition, dover.yml val-l1080p sampling)"
)
PROTOCOL_SOURCES = {
    "ewarp@lai2018": "phoenix104104/fast_blind_video_consistency evaluate_WarpError.py + "
    "utils.detect_occlusion (Lai et al. 2018)",
    "ewarp@evalcrafter": "evalcrafter/EvalCrafter metrics/RAFT/optical_flow_scores.py "
    "compute_video_warping_error + warp_utils.detect_occlusion (used by STAR and DOVE)",
    "ewarp@dloral-inframe": "dloral.bench.temporal (this suite's earlier default: Lai's mask, "
    "out-of-frame pixels dropped)",
    "tof@tecogan": "thunil/TecoGAN metrics.py (Farneback, crop_8x8, cutfr = 2)",
    "tof@dloral": "dloral.bench.temporal (TecoGAN's formula, whole frames, every pair, suite flow)",
    "tlp@tecogan": "thunil/TecoGAN metrics.py (LPIPS alex, crop_8x8, cutfr = 2, x100)",
    "tlp@dloral": "dloral.bench.temporal (TecoGAN's formula, whole frames, every pair)",
    "dover@overall": f"{_DOVER_FUSION}: sigmoid(0.6104 t + 0.3896 a), the fused score papers "
    "report as DOVER",
    "dover@technical": f"{_DOVER_FUSION}: sigmoid(t), t = (technical - 0.1107) / 0.07355",
    "dover@aesthetic": f"{_DOVER_FUSION}: sigmoid(a), a = (aesthetic + 0.08285) / 0.03774",
}
LPIPS_OF_TLP = (
    "LPIPS v0.1 AlexNet (pyiqa lpips, net-lin, as TecoGAN's net='alex'), frames [0, 1] RGB; "
    "AlexNet trunk looked for in $TORCH_HOME/hub/checkpoints, LPIPS layers in pyiqa's cache"
)


def resolve(name: str) -> str:
    """A metric name as the registry keys it: a bare temporal name gets its default protocol
    ("tof" -> "tof@tecogan"); other names are returned as given."""
    return f"{name}@{DEFAULT_PROTOCOL[name]}" if name in DEFAULT_PROTOCOL else name


def _protocol(name: str) -> str:
    base, _, protocol = name.partition("@")
    return protocol or DEFAULT_PROTOCOL[base]


def ewarp_info(
    flow_name: str, protocol: str = DEFAULT_PROTOCOL["ewarp"], flow_on: str = "output"
) -> MetricInfo:
    """How an `ewarp@protocol` result was made (the estimator's name, where flow was taken)."""
    from dloral.bench.temporal import EWARP_VARIANTS

    if protocol not in EWARP_VARIANTS:
        raise KeyError(f"unknown ewarp protocol {protocol!r}; known: {', '.join(EWARP_VARIANTS)}")
    v = EWARP_VARIANTS[protocol]
    mask = "Lai fw-bw (0.01, 0.5) + motion-boundary (0.01, 0.002) mask"
    name = f"ewarp@{protocol}"
    return METRICS[name].info(
        f"dloral.bench.temporal.ewarp [{PROTOCOL_SOURCES[name]}]: flow on {flow_on} by "
        f"{flow_name}; {mask}"
        + (", in-frame only" if v["in_frame_only"] else ", out-of-frame vs border-clamped warp")
        + f"; squared RGB [0,1] error, {v['channels']} over channels"
        + (f", frames resized x{v['resize']}" if v["resize"] != 1.0 else "")
        + (", replicate-padded to multiples of 8" if v.get("pad8") else "")
        + ("; a pair with no valid pixel counts 0" if v["empty"] == "zero" else ""),
        needs_gt=flow_on == "gt",
    )


def tof_info(flow_name: str, protocol: str = DEFAULT_PROTOCOL["tof"]) -> MetricInfo:
    """How a `tof@protocol` result was made; flow_name is the estimator's `name`."""
    name = f"tof@{protocol}"
    crop = "; flows cropped by crop_8x8, frames 2..T-3 (cutfr 2)" if protocol == "tecogan" else ""
    return METRICS[name].info(
        f"dloral.bench.temporal.tof [{PROTOCOL_SOURCES[name]}]: mean L2 flow difference in "
        f"pixels, flow by {flow_name}{crop}"
    )


def tlp_info(lpips_name: str, protocol: str = DEFAULT_PROTOCOL["tlp"]) -> MetricInfo:
    """How a `tlp@protocol` result was made; lpips_name says which LPIPS (net, version,
    weights and where they are looked for) ran."""
    name = f"tlp@{protocol}"
    crop = "; frames cropped by crop_8x8, frames 2..T-3 (cutfr 2)" if protocol == "tecogan" else ""
    return METRICS[name].info(
        f"dloral.bench.temporal.tlp [{PROTOCOL_SOURCES[name]}]: |d(out pair) - d(gt pair)|, "
        f"d = {LPIPS_OF_TLP}: {lpips_name}{crop}"
    )


def dover_info(describe: str, protocol: str = DEFAULT_PROTOCOL["dover"]) -> MetricInfo:
    """How a `dover@protocol` value was made; `describe` names the weights (path, sha256),
    the seed and the views (DoverScorer.describe)."""
    name = f"dover@{protocol}"
    return METRICS[name].info(f"dloral.bench.dover [{PROTOCOL_SOURCES[name]}]: {describe}")


def _dover(spec: MetricSpec, shared: _Shared) -> ScoredMetric:
    import torch

    protocol = _protocol(spec.name)
    scorer = shared.dover()
    return ScoredMetric(
        dover_info(scorer.describe(), protocol),
        lambda out, gt: torch.tensor(scorer.scores(out)[protocol], dtype=torch.float64),
        str(shared.device),
    )


def _cut_of(protocol: str) -> int:
    from dloral.bench.temporal import TECOGAN_CUT

    return TECOGAN_CUT if protocol == "tecogan" else 0


def _ewarp(spec: MetricSpec, shared: _Shared) -> ScoredMetric:
    from dloral.bench import temporal

    protocol = _protocol(spec.name)
    flow = shared.flow()
    keywords = temporal.EWARP_VARIANTS[protocol]
    return ScoredMetric(
        ewarp_info(flow.name, protocol),
        lambda out, gt: temporal.ewarp(out, flow=flow, **keywords),
        shared.flow_device(flow),
    )


def _tof(spec: MetricSpec, shared: _Shared) -> ScoredMetric:
    from dloral.bench import temporal

    protocol = _protocol(spec.name)
    flow = shared.farneback() if protocol == "tecogan" else shared.flow()
    crop, cut = protocol == "tecogan", _cut_of(protocol)
    return ScoredMetric(
        tof_info(flow.name, protocol),
        lambda out, gt: temporal.tof(out, gt, flow=flow, crop=crop, cut=cut),
        shared.flow_device(flow),
        first=cut,
        min_frames=2 * cut + 2,
    )


def _tlp(spec: MetricSpec, shared: _Shared) -> ScoredMetric:
    from dloral.bench import temporal

    protocol = _protocol(spec.name)
    try:
        lpips = shared.iqa("lpips")
    except MetricUnavailable as err:
        raise MetricUnavailable(f"{spec.name} needs LPIPS ({LPIPS_OF_TLP}): {err}") from err
    crop, cut = protocol == "tecogan", _cut_of(protocol)
    return ScoredMetric(
        tlp_info(lpips.info.implementation, protocol),
        lambda out, gt: temporal.tlp(out, gt, lpips=lpips, crop=crop, cut=cut),
        str(shared.device),
        first=cut,
        min_frames=2 * cut + 2,
    )


# ---- the table: name, higher_is_better, kind, level, needs_gt, protocol, builder, scale -----

_BASICSR = "BasicSR calculate_{}: uint8, crop_border from [options], float64"
_EWARP = "E*warp, {}"
# pyiqa's defaults: its Y (YIQ luma, in [0, 1]; SSIM on it rounded to integers), no crop; the
# SSIM column of papers that score with pyiqa.create_metric("ssim") (DOVE's eval_metrics.py)
_PYIQA = "pyiqa {} default: Y as pyiqa computes it, no crop"
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", True, FR, "frame", True, _BASICSR.format("psnr") + ", RGB", _fullref),
        MetricSpec("ssim", True, FR, "frame", True, _BASICSR.format("ssim") + ", RGB", _fullref),
        MetricSpec("psnr_y", True, FR, "frame", True, _BASICSR.format("psnr") + ", Y", _fullref),
        MetricSpec("ssim_y", True, FR, "frame", True, _BASICSR.format("ssim") + ", Y", _fullref),
        MetricSpec("lpips", False, FR, "frame", True, "LPIPS v0.1 AlexNet (pyiqa)", _pyiqa),
        MetricSpec("lpips_vgg", False, FR, "frame", True, "LPIPS v0.1 VGG16 (pyiqa)", _pyiqa),
        MetricSpec("dists", False, FR, "frame", True, "DISTS (pyiqa)", _pyiqa),
        MetricSpec("musiq", True, NR, "frame", False, "MUSIQ KonIQ-10k (pyiqa)", _pyiqa),
        MetricSpec("clipiqa", True, NR, "frame", False, "CLIP-IQA RN50 (pyiqa)", _pyiqa),
        MetricSpec("maniqa", True, NR, "frame", False, "MANIQA KonIQ-10k (pyiqa)", _pyiqa),
        MetricSpec("niqe", False, NR, "frame", False, "NIQE (pyiqa)", _pyiqa),
        MetricSpec("piqe", False, NR, "frame", False, "PIQE (pyiqa)", _pyiqa),
        MetricSpec("psnr_y_pyiqa", True, FR, "frame", True, _PYIQA.format("psnry"), _pyiqa_fullref),
        MetricSpec("ssim_y_pyiqa", True, FR, "frame", True, _PYIQA.format("ssim"), _pyiqa_fullref),
        *(
            MetricSpec(name, True, NR, "clip", False, source, _dover)
            for name, source in PROTOCOL_SOURCES.items()
            if name.startswith("dover@")
        ),
        *(
            MetricSpec(name, False, TEMPORAL, "pair", False, source, _ewarp, 1000.0)
            for name, source in PROTOCOL_SOURCES.items()
            if name.startswith("ewarp@")
        ),
        *(
            MetricSpec(name, False, TEMPORAL, "pair", True, source, _tof)
            for name, source in PROTOCOL_SOURCES.items()
            if name.startswith("tof@")
        ),
        *(
            MetricSpec(name, False, TEMPORAL, "pair", True, source, _tlp, 100.0)
            for name, source in PROTOCOL_SOURCES.items()
            if name.startswith("tlp@")
        ),
    )
}
FULLREF_METRICS = tuple(name for name, spec in METRICS.items() if spec.build is _fullref)


def build_metrics(
    names: tuple[str, ...] | list[str],
    device: torch.device,
    *,
    crop_border: int = 0,
    flow: str = "auto",
    strict: bool = False,
    seed: int = 0,
) -> tuple[dict[str, ScoredMetric], list[dict], str | None]:
    """Build each named metric once: ({name: ScoredMetric} in `names` order, skipped
    [{metric, reason}], the flow estimator's name or None); bare temporal names and `dover`
    are resolved to their default protocol ("tof" -> "tof@tecogan"). `flow` is an estimator
    kind of dloral.bench.flow; `crop_border` the pixels PSNR/SSIM drop on each side; `seed`
    DOVER's sampling seed (the same for every clip)."""
    names = [resolve(name) for name in names]
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {', '.join(unknown)}; valid: {', '.join(METRICS)}")
    shared = _Shared(device, crop_border, flow, strict, seed)
    # temporal metrics after the others (tlp reuses their LPIPS), in table order
    order = [n for n in names if METRICS[n].kind != TEMPORAL]
    order += [n for n, spec in METRICS.items() if n in names and spec.kind == TEMPORAL]
    built: dict[str, ScoredMetric] = {}
    skipped: list[dict] = []
    for name in order:
        spec = METRICS[name]
        try:
            built[name] = spec.build(spec, shared)
        except MetricUnavailable as err:
            if strict:
                raise
            log.warning("metric %s skipped: %s", name, err)
            skipped.append({"metric": name, "reason": str(err)})
    return {n: built[n] for n in names if n in built}, skipped, shared.flow_name
