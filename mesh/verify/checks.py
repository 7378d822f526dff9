"""The three comparisons of ``verify``, each turning measurements into a ``CheckResult``.

Pure functions of tensors and token lists: what was measured and how is stated in the result's figure
and tolerance, so a person reading one line knows what passed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mesh.verify.options import Tolerances
from mesh.verify.ours import Generation
from mesh.verify.report import CheckResult


def check_tiles(
    names: Sequence[str], ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]
) -> CheckResult:
    """Our normalised tiles against the reference ``load_image``'s, bit for bit."""
    details, differing, values, max_abs = [], 0, 0, 0.0
    for name, a, b in zip(names, ours, theirs, strict=True):
        values += b.numel()
        if a.shape != b.shape:
            differing += b.numel()
            details.append(f"{name}: {a.shape[0]} tiles, the reference made {b.shape[0]}")
            continue
        diff = (a != b).sum().item()
        if diff:
            differing += diff
            max_abs = max(max_abs, (a - b).abs().max().item())
            details.append(f"{name}: {diff} of {b.numel()} values differ")
    tiles = sum(b.shape[0] for b in theirs)
    if differing:
        figure = f"{differing} of {values} values differ in {len(details)} of {len(names)} images"
    else:
        figure = f"bit-identical: {len(names)} images, {tiles} tiles, {values} values"
    return CheckResult(
        name="tiles",
        passed=differing == 0,
        figure=figure,
        tolerance="bit-exact",
        measured={
            "images": len(names),
            "tiles": tiles,
            "values": values,
            "differing": differing,
            "max_abs_diff": max_abs,
        },
        details=details,
    )


def check_embeddings(
    names: Sequence[str], ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor], tol: Tolerances
) -> CheckResult:
    """The encoder's embeddings against ``get_image_features``: max abs diff and relative error (the
    Frobenius norm of the difference over that of the reference, all images together)."""
    details, max_abs, err_sq, ref_sq, shapes_ok = [], 0.0, 0.0, 0.0, True
    for name, a, b in zip(names, ours, theirs, strict=True):
        if a.shape != b.shape:
            shapes_ok = False
            details.append(f"{name}: shape {tuple(a.shape)}, the reference's {tuple(b.shape)}")
            continue
        d = (a.double() - b.double()).abs()
        image_max = d.max().item()
        image_rel = d.norm().item() / max(b.double().norm().item(), 1e-30)
        max_abs = max(max_abs, image_max)
        err_sq += d.norm().item() ** 2
        ref_sq += b.double().norm().item() ** 2
        details.append(f"{name}: max abs diff {image_max:.3g}, relative error {image_rel:.3g}")
    rel = math.sqrt(err_sq) / max(math.sqrt(ref_sq), 1e-30)
    measured = max_abs if tol.exact else rel
    tiles = sum(b.shape[0] for b in theirs)
    if tol.exact:
        figure = f"max abs diff {max_abs:.3g} (relative error {rel:.3g}) over {tiles} tiles"
    else:
        figure = f"relative error {rel:.3g} (max abs diff {max_abs:.3g}) over {tiles} tiles"
    return CheckResult(
        name="embeddings",
        passed=shapes_ok and measured <= tol.embeddings,
        figure=figure if shapes_ok else "shapes differ from the reference's",
        tolerance=tol.embeddings_text(),
        measured={"max_abs_diff": max_abs, "relative_error": rel, "tiles": tiles},
        details=details,
    )


@dataclass
class ReferenceTokens:
    """What the reference made of one request: its prompt length, ``generate``'s tokens, and its top-1
    choice at each position of the mesh's tokens given the mesh's prefix (teacher-forced)."""

    prompt_tokens: int
    generated: list[int]
    top1: list[int]


def check_tokens(
    names: Sequence[str], ours: Sequence[Generation], theirs: Sequence[ReferenceTokens], tol: Tolerances
) -> CheckResult:
    """Greedy tokens of the decoder against ``generate``: identical sequences (exact) or the top-1
    agreement over every generated position (tolerance)."""
    details, identical, agree, positions, sound = [], 0, 0, 0, True
    for name, g, r in zip(names, ours, theirs, strict=True):
        if g.error is not None:
            sound = False
            details.append(f"{name}: the decoder failed the request: {g.error}")
        if g.prompt_tokens != r.prompt_tokens:
            sound = False
            details.append(f"{name}: prompt of {g.prompt_tokens} tokens, the reference's {r.prompt_tokens}")
        identical += g.tokens == r.generated
        positions += len(g.tokens)
        agree += sum(a == b for a, b in zip(g.tokens, r.top1, strict=True))
        if g.tokens != r.generated:
            details.append(f"{name}: {_first_difference(g.tokens, r.generated)}")
    n = len(names)
    agreement = agree / positions if positions else 0.0
    if tol.exact:
        passed = sound and identical == n
        figure = f"{identical}/{n} sequences identical to generate ({positions} tokens, top-1 agreement {agreement:.4g})"
    else:
        passed = sound and positions > 0 and agreement >= tol.agreement
        figure = f"top-1 agreement {agreement:.4g} over {positions} positions ({identical}/{n} sequences identical to generate)"
    return CheckResult(
        name="tokens",
        passed=passed,
        figure=figure,
        tolerance=tol.tokens_text(),
        measured={"requests": n, "identical": identical, "positions": positions, "agreement": agreement},
        details=details,
    )


def _first_difference(ours: list[int], theirs: list[int]) -> str:
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"first difference at new token {k}: ours {a}, generate {b}"
    return f"ours has {len(ours)} tokens, generate {len(theirs)} (the same up to the shorter)"
