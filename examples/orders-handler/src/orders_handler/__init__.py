"""Example streamgroup handler package. Run it with STREAMGROUP_HANDLER=orders_handler:handle."""

from orders_handler.handler import handle

__all__ = ["handle"]
