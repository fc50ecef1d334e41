"""Small integer helpers shared by the layout, the primitives and the jnp twins."""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (``b > 0``), without floating point."""
    return -(-a // b)
