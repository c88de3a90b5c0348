"""A prediction's options (``target``, ``method``, ``site``), checked and written the same way for REST and gRPC.

REST sends them as multipart form fields beside the image (``site`` as the ``X-KOA-Site`` header),
gRPC as entries of the request's ``input`` map; the server reads both alike (docs/API.md).
"""

from __future__ import annotations

__all__ = ["SITE_HEADER", "check_options", "option_fields"]

SITE_HEADER = "X-KOA-Site"  # REST's way to name the site profile (docs/SITES.md)


def check_options(image: bytes, target: int | str | None, method: str | None) -> None:
    """Reject arguments of the wrong type before sending megabytes; the server checks the values.

    Raises:
        TypeError: ``image`` is not bytes, or ``method`` is not a string.
        ValueError: a negative or boolean ``target``.
    """
    if not isinstance(image, bytes | bytearray | memoryview):
        raise TypeError(f"image must be the file's bytes, got {type(image).__name__}")
    if method is not None and not isinstance(method, str):
        raise TypeError(f"method must be a string such as 'layercam' or 'ig', got {type(method).__name__}")
    if isinstance(target, bool) or (isinstance(target, int) and target < 0):
        raise ValueError(f"target must be a KL grade (0-4) or a class name such as 'KL3', got {target!r}")


def option_fields(
    image: bytes, target: int | str | None, method: str | None, site: str | None = None
) -> dict[str, str]:
    """The options given, as the text fields the server reads; those not given are left out.

    Raises:
        TypeError, ValueError: as `check_options`.
    """
    check_options(image, target, method)
    fields = {}
    if target is not None:
        fields["target"] = str(target)
    if method is not None:
        fields["method"] = method
    if site:
        fields["site"] = site
    return fields
