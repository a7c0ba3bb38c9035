"""Exact arithmetic for the model.

The expression is parsed with ``ast.parse(mode="eval")`` and only the node types handled in
``_Evaluator`` are interpreted; nothing is ever handed to eval/exec/compile, so names,
attributes, lambdas, comprehensions, f-strings, walrus and calls to anything but the functions
in ``_FUNCTIONS`` are rejected. Values are ``fractions.Fraction`` so ``0.1 + 0.2`` is exactly
``0.3``; number literals are re-read from their source text because the float the parser
produced has already lost that exactness.

Every cost is bounded before it is paid (input length, node count, nesting depth, exponent and
result size, factorial argument), so hostile inputs such as ``9**9**9**9`` fail in well under
a millisecond instead of pinning a core.

Writing quirks models copy from ordinary text, and what they mean here:

* ``×`` and ``·`` are ``*``, ``÷`` is ``/``, ``−`` (U+2212) is ``-``, ``π`` is ``pi``;
* ``^`` is a power (never XOR);
* ``$``, ``€`` or ``£`` right before a number is dropped;
* ``1,000`` and ``12,345.5`` are thousands separators: only groups of exactly three digits, and
  only when the expression calls no function (in ``max(1,000)`` the comma separates arguments);
* a trailing ``=`` is ignored;
* ``%`` written directly after a number or ``)`` and followed by the end, ``)``, ``,`` or an
  operator is a percent, i.e. ``/100``: ``15%`` is 0.15, ``200*15%`` is 30 and ``100+5%`` is
  100.05 (not 105). Every other ``%`` is Python's modulo: ``17 % 5``, ``17%5``.

Results: integers print in full up to ``MAX_PLAIN_DIGITS`` digits; fractions whose decimal
expansion terminates print exactly (``2.5``); everything else, including approximations such as
``sqrt(2)``, ``2**0.5`` or anything using ``pi``, is rounded to ``SIGNIFICANT_DIGITS`` digits.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from decimal import Context, Decimal, DecimalException, localcontext
from fractions import Fraction

from tools.errors import ToolError

MAX_EXPRESSION_CHARS = 1000
MAX_NODES = 400
MAX_DEPTH = 100
MAX_DIGITS = 10_000  # of any numerator or denominator, intermediate or final
MAX_EXPONENT = 10_000
MAX_ROOT_DEGREE = 64  # larger root degrees skip the exact-root attempt and approximate
MAX_ROUND_DIGITS = 100
MAX_PLAIN_DIGITS = 300
MAX_EXACT_DECIMALS = 30
SIGNIFICANT_DIGITS = 13
_WORK_PRECISION = 40  # for approximations, comfortably more than what is printed

_MAX_BITS = math.ceil(MAX_DIGITS * math.log2(10))
_LOG10_2 = math.log10(2)

_PI = Fraction("3.141592653589793238462643383279502884197")
_E = Fraction("2.718281828459045235360287471352662497757")
_CONSTANTS = {"pi": _PI, "e": _E}

# Explicit contexts: the ambient decimal context (28 digits) would silently round exact values.
_EXACT = Context(prec=MAX_EXACT_DECIMALS + 2)
_ROUNDED = Context(prec=SIGNIFICANT_DIGITS)

_REPLACEMENTS = {"×": "*", "·": "*", "÷": "/", "−": "-", "π": "pi", "^": "**"}
_CURRENCY = re.compile(r"[$€£](?=\s*[\d.])")
_THOUSANDS = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\w,])")
_CALL = re.compile(r"[A-Za-z_]\w*\s*\(")
_PERCENT = re.compile(r"(?<=[\d.)])%(?=\s*(?:$|[),*/+-]))")
_FLOAT_LITERAL = re.compile(r"(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?")


def evaluate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly; return the result as text.

    Raises ToolError with a message meant for the model on any syntax error, disallowed
    construct, division by zero or exceeded limit.
    """
    if not isinstance(expression, str):
        raise ToolError("calculator: the expression must be text, e.g. '2 * (3 + 4)'")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(
            f"calculator: expression too long ({len(expression)} characters, "
            f"limit {MAX_EXPRESSION_CHARS})"
        )
    source = _normalise(expression)
    if not source:
        raise ToolError("calculator: empty expression; write one like '2 * (3 + 4)'")
    evaluator = _Evaluator(source, expression)
    value = evaluator.run()
    return _format(value, evaluator.inexact)


def _normalise(text: str) -> str:
    for old, new in _REPLACEMENTS.items():
        text = text.replace(old, new)
    text = " ".join(text.split()).rstrip("= ")
    text = _CURRENCY.sub("", text)
    if not _CALL.search(text):
        text = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), text)
    return _PERCENT.sub("/100", text)


def _snippet(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def _digits(value: int) -> float:
    """Approximate decimal digit count of an integer without converting it to text."""
    return abs(value).bit_length() * _LOG10_2


class _Evaluator:
    def __init__(self, source: str, original: str) -> None:
        self.source = source
        self.original = original
        self.inexact = False  # set once any approximation (pi, irrational root) is involved

    def fail(self, problem: str) -> ToolError:
        return ToolError(f"calculator: {problem} in '{_snippet(self.original)}'")

    def run(self) -> Fraction:
        try:
            tree = ast.parse(self.source, mode="eval")
        except SyntaxError as exc:
            raise self.fail(f"syntax error ({exc.msg})") from None
        except (ValueError, RecursionError, MemoryError):
            raise self.fail("unparsable or too deeply nested expression") from None
        count = 0
        for _ in ast.walk(tree):
            count += 1
            if count > MAX_NODES:
                raise self.fail(f"expression too complex (more than {MAX_NODES} parts)")
        return self.eval(tree.body, 0)

    def eval(self, node: ast.AST, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise self.fail(f"expression nested too deeply (limit {MAX_DEPTH})")
        if isinstance(node, ast.Constant):
            return self.literal(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self.eval(node.operand, depth + 1)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left = self.eval(node.left, depth + 1)
            right = self.eval(node.right, depth + 1)
            return self.checked(_BINARY[type(node.op)](self, left, right))
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            self.inexact = True
            return _CONSTANTS[node.id]
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        raise self.fail(_describe(node))

    def literal(self, node: ast.Constant) -> Fraction:
        value = node.value
        if type(value) is int:
            return self.checked(Fraction(value))
        if type(value) is not float:
            raise self.fail(_describe(node))
        text = (ast.get_source_segment(self.source, node) or "").replace("_", "")
        match = _FLOAT_LITERAL.fullmatch(text)
        if not match:
            raise self.fail(f"unsupported number '{text}'")
        whole, fraction, exponent = match.groups()
        if exponent and abs(int(exponent)) > MAX_DIGITS:
            raise self.fail(f"number '{_snippet(text)}' is out of range")
        fraction = fraction or ""
        mantissa = Fraction(int((whole or "0") + fraction), 10 ** len(fraction))
        return self.checked(mantissa * Fraction(10) ** int(exponent or 0))

    def checked(self, value: Fraction) -> Fraction:
        if value.numerator.bit_length() > _MAX_BITS:
            raise self.fail(f"number too large (more than {MAX_DIGITS} digits)")
        if value.denominator.bit_length() > _MAX_BITS:
            raise self.fail(f"number too precise (more than {MAX_DIGITS} digits)")
        return value

    def call(self, node: ast.Call, depth: int) -> Fraction:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS:
            shown = f"'{name}'" if name else "this call"
            raise self.fail(f"function {shown} is not available (use {', '.join(_FUNCTIONS)})")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise self.fail(f"{name}() takes plain numbers only")
        low, high, function = _FUNCTIONS[name]
        if not low <= len(node.args) <= high:
            wanted = f"at least {low}" if high >= 99 else f"{low} to {high}"
            wanted = str(low) if low == high else wanted
            raise self.fail(f"{name}() takes {wanted} argument(s), got {len(node.args)}")
        args = [self.eval(arg, depth + 1) for arg in node.args]
        return self.checked(function(self, args))

    # ---- operators ----
    def divide(self, left: Fraction, right: Fraction) -> Fraction:
        if right == 0:
            raise self.fail("division by zero")
        return left / right

    def floor_divide(self, left: Fraction, right: Fraction) -> Fraction:
        if right == 0:
            raise self.fail("division by zero")
        return Fraction(left // right)

    def modulo(self, left: Fraction, right: Fraction) -> Fraction:
        if right == 0:
            raise self.fail("modulo by zero")
        return left % right

    def power(self, base: Fraction, exponent: Fraction) -> Fraction:
        if exponent == 0 or base == 1:
            return Fraction(1)
        if base == 0:
            if exponent < 0:
                raise self.fail("division by zero (0 to a negative power)")
            return Fraction(0)
        if abs(exponent) > MAX_EXPONENT:
            raise self.fail(f"exponent too large (limit {MAX_EXPONENT})")
        if base == -1 and exponent.denominator == 1:
            return Fraction(-1 if exponent.numerator % 2 else 1)
        # Checked before computing: the result has about |exponent| times the base's digits.
        size = max(_digits(base.numerator), _digits(base.denominator))
        if float(abs(exponent)) * size > MAX_DIGITS:
            raise self.fail(f"result too large (more than {MAX_DIGITS} digits)")
        if exponent.denominator == 1:
            return base**exponent.numerator
        if base < 0:
            raise self.fail("a negative number to a fractional power is not a real number")
        return self.root_power(base, exponent)

    def root_power(self, base: Fraction, exponent: Fraction) -> Fraction:
        degree = exponent.denominator
        if degree <= MAX_ROOT_DEGREE:
            top, bottom = _iroot(base.numerator, degree), _iroot(base.denominator, degree)
            if top**degree == base.numerator and bottom**degree == base.denominator:
                return Fraction(top, bottom) ** exponent.numerator
        self.inexact = True
        with localcontext(_work_context()):
            try:
                approx = (Decimal(base.numerator) / Decimal(base.denominator)) ** (
                    Decimal(exponent.numerator) / Decimal(exponent.denominator)
                )
            except DecimalException:
                raise self.fail("result out of range") from None
        return Fraction(approx)

    # ---- functions ----
    def sqrt(self, args: list[Fraction]) -> Fraction:
        if args[0] < 0:
            raise self.fail("square root of a negative number")
        return self.power(args[0], Fraction(1, 2))

    def round_half_away(self, args: list[Fraction]) -> Fraction:
        # Python's round() is banker's rounding (round(2.5) == 2); people and models expect 3.
        places = args[1] if len(args) > 1 else Fraction(0)
        if places.denominator != 1 or abs(places) > MAX_ROUND_DIGITS:
            raise self.fail(f"round() digits must be a whole number within ±{MAX_ROUND_DIGITS}")
        scale = Fraction(10) ** int(places)
        scaled = abs(args[0]) * scale
        rounded = math.floor(scaled + Fraction(1, 2))
        return Fraction(rounded if args[0] >= 0 else -rounded) / scale

    def factorial(self, args: list[Fraction]) -> Fraction:
        n = args[0]
        if n.denominator != 1 or n < 0:
            raise self.fail("factorial() needs a whole number >= 0")
        if math.lgamma(float(min(n, 10**6)) + 1) / math.log(10) > MAX_DIGITS:
            raise self.fail(f"result too large (more than {MAX_DIGITS} digits)")
        return Fraction(math.factorial(int(n)))


def _work_context() -> Context:
    # The default traps make overflow raise instead of producing Infinity.
    limit = MAX_DIGITS + _WORK_PRECISION
    return Context(prec=_WORK_PRECISION, Emax=limit, Emin=-limit)


def _iroot(n: int, k: int) -> int:
    """Floor of the k-th root of a non-negative integer, by Newton's method on integers."""
    if n < 2:
        return n
    x = 1 << -(-n.bit_length() // k)  # a power of two at or above the root
    while True:
        y = ((k - 1) * x + n // x ** (k - 1)) // k
        if y >= x:
            return x
        x = y


_BinaryOp = Callable[[_Evaluator, Fraction, Fraction], Fraction]
_BINARY: dict[type[ast.operator], _BinaryOp] = {
    ast.Add: lambda self, a, b: a + b,
    ast.Sub: lambda self, a, b: a - b,
    ast.Mult: lambda self, a, b: a * b,
    ast.Div: _Evaluator.divide,
    ast.FloorDiv: _Evaluator.floor_divide,
    ast.Mod: _Evaluator.modulo,
    ast.Pow: _Evaluator.power,
}

_Function = Callable[[_Evaluator, list[Fraction]], Fraction]
_FUNCTIONS: dict[str, tuple[int, int, _Function]] = {
    "sqrt": (1, 1, _Evaluator.sqrt),
    "abs": (1, 1, lambda self, args: abs(args[0])),
    "round": (1, 2, _Evaluator.round_half_away),
    "floor": (1, 1, lambda self, args: Fraction(math.floor(args[0]))),
    "ceil": (1, 1, lambda self, args: Fraction(math.ceil(args[0]))),
    "min": (1, 99, lambda self, args: min(args)),
    "max": (1, 99, lambda self, args: max(args)),
    "factorial": (1, 1, _Evaluator.factorial),
}


def _describe(node: ast.AST) -> str:
    """Say in model-friendly words why a node is rejected."""
    if isinstance(node, ast.Name):
        return f"unknown name '{node.id}' (only numbers, operators and {', '.join(_FUNCTIONS)})"
    if isinstance(node, ast.Attribute):
        return "attribute access ('.name') is not allowed"
    if isinstance(node, ast.Constant):
        return "only numbers are allowed, not text, booleans or complex numbers"
    if isinstance(node, ast.Tuple):
        return "a comma is only allowed between function arguments or in 1,000-style numbers"
    if isinstance(node, (ast.Compare, ast.BoolOp)):
        return "comparisons and logic are not supported"
    if isinstance(node, ast.BinOp):
        return "this operator is not supported (use + - * / // % ** and ( ))"
    if isinstance(node, ast.UnaryOp):
        return "only + and - are allowed in front of a number"
    return f"'{type(node).__name__}' is not allowed; use numbers, + - * / // % ** and ( )"


def _format(value: Fraction, inexact: bool) -> str:
    if not inexact:
        if value.denominator == 1 and _digits(value.numerator) < MAX_PLAIN_DIGITS:
            return str(value.numerator)
        exact = _exact_decimal(value)
        if exact is not None:
            return _show(exact, plain_below=MAX_EXACT_DECIMALS)
    rounded = _ROUNDED.divide(Decimal(value.numerator), Decimal(value.denominator))
    return _show(rounded, plain_below=SIGNIFICANT_DIGITS)


def _exact_decimal(value: Fraction) -> Decimal | None:
    """The exact decimal if it has at most MAX_EXACT_DECIMALS places and digits, else None."""
    denominator = value.denominator
    twos = (denominator & -denominator).bit_length() - 1
    denominator >>= twos
    fives = 0
    # Bounded loop: a denominator with more fives than that is not shown exactly anyway.
    while denominator % 5 == 0 and fives <= MAX_EXACT_DECIMALS:
        denominator //= 5
        fives += 1
    places = max(twos, fives)
    if denominator != 1 or places > MAX_EXACT_DECIMALS:
        return None
    scaled = value.numerator * 10**places // value.denominator
    if _digits(scaled) > MAX_EXACT_DECIMALS + 1:
        return None
    exact = Decimal(scaled).scaleb(-places, context=_EXACT)
    if len(exact.normalize(context=_EXACT).as_tuple().digits) > MAX_EXACT_DECIMALS:
        return None
    return exact


def _show(number: Decimal, plain_below: int) -> str:
    """Plain notation for everyday magnitudes, scientific for tiny or huge ones."""
    number = number.normalize(context=_EXACT)
    if number.is_zero():
        return "0"
    if -7 <= number.adjusted() < plain_below:
        return format(number, "f")
    return format(number, "e")
