"""Step-by-step evaluation of integer arithmetic expressions (worked solutions)."""

from __future__ import annotations

import ast

_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


def _fold_signs(node: ast.expr) -> ast.expr:
    """Turn ``-<literal>`` into a negative literal so it is not counted as a step."""
    if isinstance(node, ast.UnaryOp):
        operand = _fold_signs(node.operand)
        if isinstance(operand, ast.Constant) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = -operand.value if isinstance(node.op, ast.USub) else operand.value
            return ast.Constant(value)
        return ast.UnaryOp(node.op, operand)
    if isinstance(node, ast.BinOp):
        return ast.BinOp(_fold_signs(node.left), node.op, _fold_signs(node.right))
    return node


def _check(node: ast.AST) -> None:
    """Raise ``ValueError`` unless ``node`` is integer ``+ - * /`` arithmetic."""
    for child in ast.walk(node):
        if isinstance(child, ast.Constant):
            if type(child.value) is not int:
                raise ValueError(f"only integer literals are supported, got {child.value!r}")
        elif isinstance(child, ast.BinOp):
            if not isinstance(child.op, _OPERATORS):
                raise ValueError(f"unsupported operator {type(child.op).__name__}")
        elif isinstance(child, ast.UnaryOp):
            if not isinstance(child.op, (ast.USub, ast.UAdd)):
                raise ValueError(f"unsupported operator {type(child.op).__name__}")
        elif not isinstance(child, (ast.Expression, ast.operator, ast.unaryop)):
            raise ValueError(f"unsupported syntax {type(child).__name__}")


def _apply(operator: ast.operator, left: int, right: int, floor_division: bool) -> int:
    """Apply one binary operator to two integers."""
    if isinstance(operator, ast.Add):
        return left + right
    if isinstance(operator, ast.Sub):
        return left - right
    if isinstance(operator, ast.Mult):
        return left * right
    if not floor_division and left % right:
        raise ValueError(f"{left} / {right} is not an integer")
    return left // right


def _reduce_once(node: ast.expr, floor_division: bool) -> ast.expr:
    """Evaluate the leftmost innermost operation of ``node``."""
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.operand, ast.Constant):
            value = node.operand.value
            return ast.Constant(-value if isinstance(node.op, ast.USub) else value)
        return ast.UnaryOp(node.op, _reduce_once(node.operand, floor_division))
    if isinstance(node, ast.BinOp):
        if not isinstance(node.left, ast.Constant):
            return ast.BinOp(_reduce_once(node.left, floor_division), node.op, node.right)
        if not isinstance(node.right, ast.Constant):
            return ast.BinOp(node.left, node.op, _reduce_once(node.right, floor_division))
        value = _apply(node.op, node.left.value, node.right.value, floor_division)
        return ast.Constant(value)
    raise ValueError(f"cannot reduce {ast.dump(node)}")


def arithmetic_steps(expression: str, *, floor_division: bool = True) -> list[str]:
    """Rewrite an expression one operation at a time down to its value.

    Parameters
    ----------
    expression : str
        Integer arithmetic with ``+ - * /``, unary minus and parentheses, e.g.
        ``"-1515 / 5 + -( -2842 * -5436 )"``.
    floor_division : bool, optional
        Evaluate ``/`` as floor division (reasoning-gym ``basic_arithmetic``
        does); when ``False`` a non-exact division raises ``ValueError``.

    Returns
    -------
    list of str
        The expression in canonical spacing, then each intermediate form; the
        last item is the value.

    Raises
    ------
    ValueError
        If the expression is not integer ``+ - * /`` arithmetic, or divides by
        zero.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from error
    _check(tree)
    tree = _fold_signs(tree)
    steps = [ast.unparse(tree)]
    try:
        while not isinstance(tree, ast.Constant):
            tree = _fold_signs(_reduce_once(tree, floor_division))
            text = ast.unparse(tree)
            if text != steps[-1]:
                steps.append(text)
    except ZeroDivisionError as error:
        raise ValueError(f"division by zero in {expression!r}") from error
    return steps
