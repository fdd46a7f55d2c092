"""Reference profiles for the agent: from config files, uploads, raw samples and the store.

    references = References(settings)
    references.lookup("churn", "v1")                 # file from config, else the last stored
    profile = references.from_document("churn", "v1", body, now_unix_nano=time.time_ns())
    references.save(profile)

    uploads = ReferenceUploads(references, install=agent.install_reference,
                               latest_version=agent.latest_version, max_bytes=16 << 20)
    uploaded = await uploads.put("churn", "v1", raw_json_bytes)   # HTTP PUT and gRPC PutReference

A document is either a reference file (what ``mlsidecar reference build`` writes,
recognised by its ``schema_version``) or raw sample columns::

    {"features": {"age": [31, 45, null], "city": ["Oslo", "Rome", null]},
     "scores": [0.2, 0.9, 0.4], "labels": ["no", "yes", "no"]}
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import MODEL_NAME_PATTERN, Settings
from agent.engine import ModelLimitError, ReferenceProfile
from agent.ingest.decode import VERSION_PATTERN
from agent.store.references import ReferenceStore, ReferenceStoreError

log = logging.getLogger(__name__)


def load_reference_file(path: Path, model: str, field: str) -> ReferenceProfile:
    """A reference file from config, checked at start so a bad one fails before serving."""
    try:
        document = json.loads(path.read_bytes())
        profile = ReferenceProfile.from_dict(document)
    except (OSError, ValueError) as error:
        raise ValueError(f"{field}: cannot use reference file {str(path)!r}: {error}") from None
    if profile.model != model:
        raise ValueError(f"{field}: {str(path)!r} is a reference for model {profile.model!r}")
    return dataclasses.replace(profile, source="file")


class References:
    """Where a model version's reference comes from: config file, else the last one stored."""

    def __init__(self, settings: Settings) -> None:
        self._engine_settings = settings.engine
        self.store = ReferenceStore(
            settings.store.data_dir / "references", history=settings.engine.reference_history
        )
        self._files = {
            name: load_reference_file(model.reference, name, f"models.{name}.reference")
            for name, model in settings.models.items()
            if model.reference is not None
        }

    def lookup(self, model: str, version: str) -> ReferenceProfile | None:
        from_file = self._files.get(model)
        if from_file is not None:
            return dataclasses.replace(from_file, version=version)
        try:
            stored = self.store.latest(model, version)
            return None if stored is None else ReferenceProfile.from_dict(stored)
        except (ValueError, ReferenceStoreError) as error:
            log.error("ignoring stored reference", extra={"model": model, "error": str(error)})
            return None

    def save(self, profile: ReferenceProfile) -> None:
        self.store.save(profile.model, profile.version, profile.to_dict())
        log.info(
            "reference saved",
            extra={
                "model": profile.model,
                "version": profile.version,
                "id": profile.id,
                "source": profile.source,
                "rows": profile.rows,
            },
        )

    def from_document(
        self, model: str, version: str, document: Any, *, now_unix_nano: int, field: str = "body"
    ) -> ReferenceProfile:
        """A reference file or raw sample columns, for ``model`` / ``version``; ValueError names the field.

        ``field`` names the whole document in errors (``body`` over HTTP, ``document`` over gRPC).
        """
        if not isinstance(document, Mapping):
            raise ValueError(f"{field}: expected a JSON object")
        if "schema_version" in document:
            profile = ReferenceProfile.from_dict(dict(document))
            return dataclasses.replace(profile, model=model, version=version, source="upload")
        numbers, categories = sample_columns(document)
        engine = self._engine_settings
        return ReferenceProfile.from_columns(
            model,
            version,
            numbers=numbers,
            categories=categories,
            scores=_floats("scores", document["scores"]) if "scores" in document else None,
            labels=_labels("labels", document["labels"]) if "labels" in document else None,
            source="upload",
            created_unix_nano=now_unix_nano,
            psi_bins=engine.psi_bins,
            cdf_bins=engine.cdf_bins,
            top_k=engine.top_k,
        )


class ReferenceRejected(ValueError):
    """An upload refused; ``reason`` is a short label. None is transient: the same request
    fails again.

    ``invalid_model`` (model or version), ``invalid_reference`` (the document) and
    ``reference_too_large`` change nothing. ``too_many_models`` (the engine tracks
    ``ingest.max_models`` versions already) comes after the reference was stored: the
    version finds it once the engine tracks it.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True, slots=True)
class UploadedReference:
    """What an upload installed: the answer of HTTP PUT and of gRPC PutReference."""

    model: str
    version: str
    id: str
    source: str
    rows: int
    features: list[str]

    @classmethod
    def of(cls, profile: ReferenceProfile) -> UploadedReference:
        return cls(
            profile.model,
            profile.version,
            profile.id,
            profile.source,
            profile.rows,
            sorted(profile.features),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ReferenceUploads:
    """Reference uploads, one code path for ``PUT /v1/models/{model}/reference`` and gRPC
    ``PutReference``: the same checks, limits, errors and effect whatever the transport.

        uploads = ReferenceUploads(references, install=agent.install_reference,
                                   latest_version=agent.latest_version, max_bytes=16 << 20)
        uploaded = await uploads.put("churn", "v3", Path("churn-ref.json").read_bytes())
        uploaded.id, uploaded.rows, uploaded.features      # ReferenceRejected names the field

    Authorisation is the transport's job (its admin-token check runs before ``put``).
    """

    def __init__(
        self,
        references: References,
        *,
        install: Callable[[ReferenceProfile], None],
        latest_version: Callable[[str], str | None],
        max_bytes: int,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.references = references
        self._install = install
        self._latest_version = latest_version
        self.max_bytes = max_bytes
        self._clock = clock

    def check_size(self, size: int, field: str) -> None:
        """Refuse an upload of ``size`` bytes before reading it further."""
        if size > self.max_bytes:
            raise ReferenceRejected(
                "reference_too_large",
                f"{field}: {size} bytes, over ingest.max_message_bytes={self.max_bytes}; "
                "profile a large sample with `mlsidecar reference build` and upload the file",
            )

    async def put(
        self, model: str, version: str | None, raw: bytes, *, field: str = "body"
    ) -> UploadedReference:
        """Profile (or read) ``raw``, store it, then judge ``model`` / ``version`` against it.

        ``version`` None means the model's latest version seen, or "" if it sent nothing.
        ``field`` names the document in errors. The reference in use is unchanged when
        this raises.
        """
        if not MODEL_NAME_PATTERN.fullmatch(model):
            what = (
                f"{model[:140]!r} does not match [A-Za-z0-9._-]{{1,128}}" if model else "is empty"
            )
            raise ReferenceRejected("invalid_model", f"model: {what}")
        if version is None:
            version = self._latest_version(model) or ""
        elif not VERSION_PATTERN.fullmatch(version):
            raise ReferenceRejected(
                "invalid_model",
                f"model_version: {version[:140]!r} must be at most 128 printable ASCII "
                "characters without spaces",
            )
        self.check_size(len(raw), field)
        try:  # off the event loop: parsing and profiling up to max_bytes of JSON takes a while
            profile = await asyncio.to_thread(
                self._profile, model, version, raw, field, self._clock()
            )
        except ValueError as error:
            raise ReferenceRejected("invalid_reference", str(error)) from None
        try:
            await asyncio.to_thread(self._install, profile)
        except ModelLimitError as error:
            raise ReferenceRejected("too_many_models", str(error)) from None
        return UploadedReference.of(profile)

    def _profile(
        self, model: str, version: str, raw: bytes, field: str, now_unix_nano: int
    ) -> ReferenceProfile:
        try:
            document = json.loads(raw) if raw.strip() else None
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{field}: not valid JSON: {error}") from None
        return self.references.from_document(
            model, version, document, now_unix_nano=now_unix_nano, field=field
        )


SAMPLE_KEYS = frozenset({"features", "scores", "labels"})


def sample_columns(
    document: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, list[str | None]]]:
    """Split ``document["features"]`` into numeric and categorical columns by their values."""
    unknown = sorted(set(document) - SAMPLE_KEYS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (expected features, scores, labels)")
    features = document.get("features")
    if not isinstance(features, Mapping) or not features:
        raise ValueError("features: expected an object of feature name -> list of values")
    numbers: dict[str, Any] = {}
    categories: dict[str, list[str | None]] = {}
    lengths = set()
    for name, values in features.items():
        field = f"features.{name}"
        if not isinstance(values, list):
            raise ValueError(f"{field}: expected a list of values")
        lengths.add(len(values))
        present = [v for v in values if v is not None]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
            numbers[name] = _floats(field, values)
        elif all(isinstance(v, str) for v in present):
            categories[name] = list(values)
        else:
            raise ValueError(f"{field}: mixes numbers and strings; send one type per feature")
    if len(lengths) > 1:
        raise ValueError(f"features: columns differ in length ({sorted(lengths)})")
    return numbers, categories


def _floats(field: str, values: Any) -> Any:
    if not isinstance(values, list):
        raise ValueError(f"{field}: expected a list of numbers")
    try:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: expected numbers (null for missing)") from None


def _labels(field: str, values: Any) -> list[str | None]:
    if not isinstance(values, list) or not all(v is None or isinstance(v, str) for v in values):
        raise ValueError(f"{field}: expected a list of strings (null for missing)")
    return list(values)
