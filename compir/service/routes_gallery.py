"""Gallery endpoints: list, count, fetch an image, add by upload, remove. A write is answered once
it is on disk (atomically, fsynced), so an answered write survives a crash or a restart."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from compir.errors import InputError
from compir.runtime.uploads import upload_item_id, validate_item_id
from compir.service.engine import ServiceEngine, UnknownItemError
from compir.service.forms import Form, FormField, FormSpec
from compir.service.inputs import check_bytes, check_count, decode_image, in_executor, require_json
from compir.service.schemas import AddOut, CountOut, ItemsPage, RemoveIn, RemoveOut, errors

router = APIRouter(prefix="/gallery", tags=["gallery"])
MAX_PAGE = 1000
ADD_FORM = FormSpec(
    FormField("files", "file", "one or more images", repeated=True, required=True),
    FormField("ids", "text", "an id per file (default: the file name after its last / or \\, without extension: "
              "../../x.png -> x)", repeated=True),
    FormField("replace", "boolean", "replace items whose id is already in the gallery (else 409)", default=False),
)


@router.get("/items", response_model=ItemsPage, responses=errors(401, 422))
async def list_items(
    request: Request,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
) -> ItemsPage:
    """One page of gallery item ids, in index order."""
    engine: ServiceEngine = request.app.state.engine
    total, ids = await in_executor(request.app.state.executor, lambda: engine.list_items(offset=offset, limit=limit))
    return ItemsPage(total=total, offset=offset, limit=limit, items=ids)


@router.get("/count", response_model=CountOut, responses=errors(401))
async def count(request: Request) -> CountOut:
    engine: ServiceEngine = request.app.state.engine
    return CountOut(count=await in_executor(request.app.state.executor, engine.count))


@router.get("/items/{item_id:path}/image", response_class=FileResponse, responses=errors(401, 404, 422))
async def item_image(request: Request, item_id: str) -> FileResponse:
    """The stored image of a gallery item."""
    engine: ServiceEngine = request.app.state.engine
    path = await in_executor(request.app.state.executor, engine.image_path, item_id)
    if path is None or not path.is_file():
        raise UnknownItemError(f"item {item_id!r}: not in the gallery, or its image is not stored")
    return FileResponse(path)


@router.post("/items", response_model=AddOut, openapi_extra=ADD_FORM.openapi(),
             responses=errors(400, 401, 409, 413, 415, 422))
async def add_items(request: Request, form: Annotated[Form, Depends(ADD_FORM.read)]) -> AddOut:
    """Add images to the gallery; they are searchable and on disk when this returns. An id already in
    the gallery is a 409 naming it (nothing added) unless ``replace=true``; ids follow the grammar
    of relative paths (``a/b``), else 422."""
    engine: ServiceEngine = request.app.state.engine
    limits = engine.config.limits
    files, ids = form.uploads("files"), form.texts("ids")
    check_count(len(files), limits, what="files")
    if ids and len(ids) != len(files):
        raise InputError(f"got {len(ids)} ids for {len(files)} files; give one id per file or none")
    names = ids or [upload_item_id(f.filename) for f in files]
    items: dict[str, bytes] = {}
    for name, upload in zip(names, files, strict=True):
        field = f"files[{upload.filename or len(items)}]"
        validate_item_id(name)
        if name in items:
            raise InputError(f"{field}: id {name!r} appears twice in this request")
        data = check_bytes(upload.data, limits, field=field)
        # Decode now so a bad file is refused with its name before anything is written.
        await in_executor(request.app.state.executor, decode_image, data, limits, field=field)
        items[name] = data
    done, count = await in_executor(request.app.state.executor, engine.add_items, items, replace=form.flag("replace"))
    return AddOut(added=list(done.added), replaced=list(done.replaced), count=count)


@router.post("/remove", response_model=RemoveOut, dependencies=[Depends(require_json)], responses=errors(401, 404, 413, 415, 422))
async def remove_items(request: Request, body: RemoveIn) -> RemoveOut:
    """Remove items by id; 404 and nothing removed when an id is not in the gallery."""
    engine: ServiceEngine = request.app.state.engine
    check_count(len(body.ids), engine.config.limits, what="ids")
    removed, count = await in_executor(request.app.state.executor, engine.remove_items, body.ids)
    return RemoveOut(removed=removed, count=count)


@router.delete("/items/{item_id:path}", response_model=RemoveOut, responses=errors(401, 404, 422))
async def remove_item(request: Request, item_id: str) -> RemoveOut:
    """Remove one item; 404 when it is not in the gallery."""
    engine: ServiceEngine = request.app.state.engine
    removed, count = await in_executor(request.app.state.executor, engine.remove_items, [item_id])
    return RemoveOut(removed=removed, count=count)

