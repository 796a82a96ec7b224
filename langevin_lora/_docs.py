r"""Docstrings that read in plain text (``help()``, IDE tooltips) and keep their math (issue 19).

The docstrings write math as reStructuredText (``:math:`\eta\lambda_{\max}```, ``.. math::`` blocks).
No Sphinx build renders them here, so ``help(LangevinSGD)`` showed the raw roles. :func:`plain_math`
rewrites the roles and blocks into Unicode text (``ηλ_max``); :func:`readable_docstring` applies it to a
class's docstring, the one ``help()`` shows first. The LaTeX source stays in the module file.
"""
from __future__ import annotations

import re
from typing import TypeVar

__all__ = ["plain_math", "readable_docstring"]

_SYMBOLS = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "Delta": "Δ", "epsilon": "ε", "eta": "η",
    "theta": "θ", "kappa": "κ", "lambda": "λ", "mu": "μ", "xi": "ξ", "pi": "π", "rho": "ρ", "sigma": "σ",
    "Sigma": "Σ", "phi": "φ", "omega": "ω", "nabla": "∇", "odot": "⊙", "cdot": "·", "le": "≤", "leq": "≤",
    "ge": "≥", "geq": "≥", "lesssim": "≲", "approx": "≈", "propto": "∝", "infty": "∞", "sum": "Σ",
    "times": "×", "in": "∈", "leftarrow": "←", "to": "→", "mapsto": "↦", "lVert": "‖", "rVert": "‖",
    "lvert": "|", "rvert": "|", "partial": "∂", "sim": "~", "neq": "≠", "ll": "≪", "gg": "≫", "pm": "±",
    "max": "max", "min": "min", "exp": "exp", "log": "log", "quad": "  ", "qquad": "    ", "langle": "⟨",
    "rangle": "⟩", "top": "ᵀ", "dots": "…", "ldots": "…",
}
_DROP = ("big", "Big", "left", "right", "displaystyle", "mathbb", "boldsymbol")


def _braced(s: str, i: int) -> tuple[str, int]:
    """The content of the brace group opening at ``s[i] == "{"`` and the index after it."""
    depth, j = 0, i
    while j < len(s):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1:j], j + 1
        j += 1
    return s[i + 1:], len(s)


def _token(s: str, i: int) -> tuple[str, int]:
    """One argument at ``s[i]`` (spaces skipped): a brace group, a ``\\command`` or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return "", i
    if s[i] == "{":
        return _braced(s, i)
    if s[i] == "\\":
        m = re.match(r"\\([A-Za-z]+|.)", s[i:])
        return m.group(0), i + m.end()
    return s[i], i + 1


def _group(text: str) -> str:
    """``text``, parenthesised unless it is one symbol or a plain word/number."""
    return text if len(text) <= 1 or re.fullmatch(r"[\w.]+", text) else f"({text})"


def _latex(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = re.match(r"\\([A-Za-z]+)|\\(.)", s[i:])
            name = m.group(1) or m.group(2)
            i += m.end()
            if name in ("frac", "tfrac", "dfrac"):
                num, i = _token(s, i)
                den, i = _token(s, i)
                out.append(f"{_group(_latex(num))}/{_group(_latex(den))}")
            elif name == "sqrt":
                arg, i = _token(s, i)
                out.append("√" + _group(_latex(arg)))
            elif name in ("operatorname", "mathrm", "text", "mathit", "mathbf", "textrm") and i < len(s) and s[i] == "{":
                arg, i = _braced(s, i)
                out.append(_latex(arg))
            elif name == "hat" and i < len(s):
                arg, i = _braced(s, i) if s[i] == "{" else (s[i:i + 2].strip(), i + 2)
                out.append(_latex(arg).strip() + "\u0302")
            elif name == "mathrel" and i < len(s) and s[i] == "{":
                arg, i = _braced(s, i)
                out.append(_latex(arg))
            elif name in _SYMBOLS:
                out.append(_SYMBOLS[name])
            elif name in _DROP:
                continue
            elif name in (",", ";", ":", "!", " "):
                out.append(" " if name != "!" else "")
            elif name in ("{", "}", "|", "%", "_", "&"):
                out.append("‖" if name == "|" else name)
            else:
                out.append(name)
        elif c in "^_" and i + 1 < len(s):
            arg, i = _token(s, i + 1)
            arg = _latex(arg)
            out.append(f"{c}{arg}" if len(arg) == 1 or c == "_" else f"^({arg})")
        elif c in "{}":
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def plain_math(doc: str | None) -> str | None:
    """``doc`` with every ``:math:`…``` role and ``.. math::`` block written as Unicode text."""
    if not doc:
        return doc
    doc = re.sub(r":math:`([^`]*)`", lambda m: _latex(m.group(1)), doc)
    lines, out, block = doc.split("\n"), [], None
    for line in lines:
        stripped = line.strip()
        if stripped == ".. math::":
            block = len(line) - len(line.lstrip())
            continue
        if block is not None:
            if stripped and len(line) - len(line.lstrip()) <= block:
                block = None
            else:
                out.append(line[:len(line) - len(line.lstrip())] + _latex(stripped) if stripped else line)
                continue
        out.append(line)
    text = "\n".join(out)
    return re.sub(r":(?:class|func|meth|mod|data|attr):`~?([^`]*)`", r"``\1``", text)


T = TypeVar("T")


def readable_docstring(obj: T) -> T:
    """Class decorator: the class docstring through :func:`plain_math` (``help()`` reads it as text)."""
    obj.__doc__ = plain_math(obj.__doc__)
    return obj
