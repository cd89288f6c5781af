"""Large binary values of an instance's header served by reference (PS3.18 8.6, F.2.7).

WADO-RS metadata names each large binary value (overlays, icon images, encapsulated PDFs,
waveforms, private blobs) by a BulkDataURI instead of inlining it, so a viewer's metadata call
stays small and it fetches only what it shows. A value is addressed by its path in the dataset:
``00420011`` at the top level, ``00880200/0/7FE00010`` inside the first item of a sequence.
The pixel data has its own route, served by byte range without parsing the header.
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import AMBIGUOUS_VR, BYTES_VR, VR

from services.gateway.dicomweb_common import HttpError

# Binary values of this many bytes or more go out as BulkDataURI; smaller ones inline (base64).
BULK_DATA_MIN_BYTES = 1024
# pydicom compares its threshold with the base64 length: values of len > (t // 4) * 3 are bulk.
PYDICOM_THRESHOLD = (BULK_DATA_MIN_BYTES - 1) // 3 * 4
# The VRs pydicom's to_json_dict treats as binary (an unresolved "OB or OW" included).
BINARY_VRS = frozenset((BYTES_VR | AMBIGUOUS_VR) - {VR.US_SS})


def uri_handler(ds: Dataset, instance_uri: str) -> Callable[[DataElement], str]:
    """For pydicom's ``to_json_dict``: each large binary element's BulkDataURI under ``instance_uri``.

    pydicom hands the handler the element only, not where it sits, so the paths are found by
    walking the same element objects that ``to_json_dict`` visits: once, at the first large
    value (most headers have none, and pay no walk).
    """
    paths: dict[int, str] = {}

    def walk(dataset: Dataset, prefix: str) -> None:
        for elem in dataset:
            here = f"{prefix}{elem.tag:08X}"
            if elem.VR == "SQ":
                for n, item in enumerate(elem.value):
                    walk(item, f"{here}/{n}/")
            elif elem.VR in BINARY_VRS:
                paths[id(elem)] = here

    def handler(elem: DataElement) -> str:
        if not paths:
            walk(ds, "")
        return f"{instance_uri}/bulkdata/{paths[id(elem)]}"

    return handler


def parse_path(text: str) -> list[int]:
    """``TTTTTTTT[/index/TTTTTTTT]...`` as alternating tags and item indexes; 400 if malformed."""
    parts = text.strip("/").split("/")
    if len(parts) % 2 == 0:
        raise HttpError(400, "bulk data path: a tag, or sequence tag/item index/tag ...")
    out: list[int] = []
    for n, part in enumerate(parts):
        if n % 2 == 0:
            if len(part) != 8:
                raise HttpError(400, "bulk data path: tags are 8 hex digits")
            try:
                out.append(int(part, 16))
            except ValueError:
                raise HttpError(400, "bulk data path: tags are 8 hex digits") from None
        else:
            if not part.isdigit():
                raise HttpError(400, "bulk data path: item indexes are integers from 0")
            out.append(int(part))
    return out


def value_at(ds: Dataset, path: list[int]) -> bytes:
    """The binary value the path names; 404 if there is none (absent, empty or not binary)."""
    here = ds
    for n in range(0, len(path) - 1, 2):
        tag, index = Tag(path[n]), path[n + 1]
        if tag not in here or here[tag].VR != "SQ" or index >= len(here[tag].value):
            raise HttpError(404, "no such bulk data in this instance")
        here = here[tag].value[index]
    tag = Tag(path[-1])
    value = here[tag].value if tag in here and here[tag].VR in BINARY_VRS else None
    if not isinstance(value, bytes | bytearray) or not value:
        raise HttpError(404, "no such bulk data in this instance")
    return bytes(value)
