"""The EHR events reader: a MEDS-like events table and the scan times that time-to-event labels start from.

Events: one row per (``patient_id``, ``time``, ``code``), in parquet (needs pyarrow) or CSV. Scans: one row
per (``scan_id``, ``patient_id``, ``time``), the acquisition time of each scan. Times are numbers (days) or
datetimes (converted to days since 1970-01-01); events and scans must use the same kind. A patient's record
starts at its ``MEDS_BIRTH`` event when it has one, else at its first event, and ends at its last event (or at
its last scan when that is later). Patients, codes and times become integer and float arrays (``EventTable``,
``ScanTable``) so that task selection and labels are vectorised (vlsurv.tte.labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vlsurv.errors import InputError

EVENT_COLUMNS = ("patient_id", "time", "code")
SCAN_COLUMNS = ("scan_id", "patient_id", "time")
BIRTH_CODE = "MEDS_BIRTH"
NANOSECONDS_PER_DAY = 86_400e9


class TTEInputError(InputError):
    """An events or scans table that cannot give time-to-event labels (columns, types, times, tasks)."""


@dataclass
class EventTable:
    """Events as arrays: ``patient`` (E,) int64 into ``patients``, ``time`` (E,) float64 days, ``code`` (E,)
    int64 into ``codes``; ``record_start`` and ``record_end`` (P,) float64 days per patient."""

    patient: np.ndarray
    time: np.ndarray
    code: np.ndarray
    patients: np.ndarray
    codes: np.ndarray
    record_start: np.ndarray
    record_end: np.ndarray


@dataclass
class ScanTable:
    """Scans as arrays: ``scan_ids`` (S,) str, ``patient`` (S,) int64 into ``EventTable.patients``, ``time``
    (S,) float64 days."""

    scan_ids: np.ndarray
    patient: np.ndarray
    time: np.ndarray


def read_table(source: pd.DataFrame | str | Path, what: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """A frame with ``columns`` from a frame, a ``.parquet`` file or a CSV file (``code`` read as text)."""
    if isinstance(source, pd.DataFrame):
        frame, name = source, source.attrs.get("name", what)  # a frame read here before keeps its file name
    else:
        path, name = Path(source), str(source)
        if path.suffix == ".parquet":
            try:
                frame = pd.read_parquet(path)
            except ImportError as err:
                raise TTEInputError(
                    f"{path}: reading parquet needs pyarrow ({err}); install it or pass a CSV file"
                ) from err
        else:
            frame = pd.read_csv(path, dtype={"code": str, "scan_id": str})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TTEInputError(f"{name}: missing columns {missing}; expected {list(columns)}")
    frame.attrs["name"] = name
    return frame


def _check_codes(frame: pd.DataFrame) -> np.ndarray:
    """The ``code`` column as str (E,); TTEInputError when it is missing somewhere or mixes types."""
    name, codes = frame.attrs["name"], frame["code"]
    missing = codes.isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise TTEInputError(f"{name}: row {row}: `code` is missing; expected a code in every event row")
    kind = pd.api.types.infer_dtype(codes, skipna=False)
    if kind.startswith("mixed"):
        kinds = codes.map(lambda value: type(value).__name__)
        first = kinds.drop_duplicates()
        examples = ", ".join(f"{t} (row {row}: {codes.iloc[row]!r})" for row, t in first.items())
        raise TTEInputError(
            f"{name}: column `code` mixes types: {examples}; expected one type (text codes like 'ICD10/J91')"
        )
    return codes.astype(str).to_numpy()


def _days(values: pd.Series, name: str, column: str) -> tuple[np.ndarray, bool]:
    """(times in days as float64, whether they were datetimes); strings are parsed as datetimes."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan), False
    try:
        stamps = pd.to_datetime(values)
    except (ValueError, TypeError) as err:
        raise TTEInputError(
            f"{name}: column `{column}` is neither numeric (days) nor datetimes: {err}"
        ) from err
    days = stamps.to_numpy(dtype="datetime64[ns]").astype(np.int64) / NANOSECONDS_PER_DAY
    return np.where(stamps.isna().to_numpy(), np.nan, days), True


def _shown(value) -> str:
    """``repr`` of an id as the user wrote it (a numpy integer as a plain one)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _ids(values: pd.Series) -> pd.Series:
    return values if pd.api.types.is_integer_dtype(values) else values.astype(str)


def load_events(
    events: pd.DataFrame | str | Path, scans: pd.DataFrame | str | Path
) -> tuple[EventTable, ScanTable]:
    """Read and check the events and scans tables -> (EventTable, ScanTable).

    Raises TTEInputError for a missing column, a missing or mixed-type code, a missing event or scan time,
    times of different kinds, a scan whose patient has no event, and an event or scan before the patient's
    first record (its ``MEDS_BIRTH`` event, or its first event).
    """
    event_frame = read_table(events, "events", EVENT_COLUMNS)
    scan_frame = read_table(scans, "scans", SCAN_COLUMNS)
    event_name, scan_name = event_frame.attrs["name"], scan_frame.attrs["name"]
    codes = _check_codes(event_frame)
    event_time, event_dates = _days(event_frame["time"], event_name, "time")
    scan_time, scan_dates = _days(scan_frame["time"], scan_name, "time")
    missing = np.flatnonzero(np.isnan(event_time))
    if missing.size:
        raise TTEInputError(f"{event_name}: row {int(missing[0])}: `time` is missing; expected an event time")
    missing = np.flatnonzero(np.isnan(scan_time))
    if missing.size:
        row = int(missing[0])
        raise TTEInputError(
            f"{scan_name}: row {row} (scan_id {_shown(scan_frame['scan_id'].iloc[row])}): `time` is missing; "
            "expected each scan's acquisition time"
        )
    if event_dates != scan_dates:
        kinds = {True: "datetimes", False: "numbers (days)"}
        raise TTEInputError(
            f"{scan_name}: scan times are {kinds[scan_dates]} but the event times of {event_name} are "
            f"{kinds[event_dates]}; expected the same kind in both"
        )
    patient, patients = pd.factorize(_ids(event_frame["patient_id"]))
    code, code_names = pd.factorize(pd.Series(codes))
    scan_patient = pd.Index(patients).get_indexer(_ids(scan_frame["patient_id"]))
    unknown = np.flatnonzero(scan_patient < 0)
    if unknown.size:
        row = int(unknown[0])
        raise TTEInputError(
            f"{scan_name}: row {row}: patient_id {_shown(scan_frame['patient_id'].iloc[row])} has no event "
            f"in {event_name}; expected every scanned patient to have an EHR record"
        )
    by_patient = pd.Series(event_time).groupby(patient)
    first, last = by_patient.min().to_numpy(), by_patient.max().to_numpy()
    record_start = _birth_times(event_name, np.asarray(patients), patient, event_time, codes, first)
    before = np.flatnonzero(scan_time < record_start[scan_patient])
    if before.size:
        row = int(before[0])
        raise TTEInputError(
            f"{scan_name}: row {row} (scan_id {_shown(scan_frame['scan_id'].iloc[row])}): scan time "
            f"{scan_time[row]:g} days is before patient {_shown(patients[scan_patient[row]])}'s first record "
            f"at {record_start[scan_patient[row]]:g} days; expected scans within the EHR record"
        )
    record_end = np.maximum(
        last,
        pd.Series(scan_time)
        .groupby(scan_patient)
        .max()
        .reindex(range(len(patients)), fill_value=-np.inf)
        .to_numpy(),
    )
    return (
        EventTable(
            patient.astype(np.int64),
            event_time,
            code.astype(np.int64),
            np.asarray(patients),
            np.asarray(code_names, dtype=str),
            record_start,
            record_end,
        ),
        ScanTable(scan_frame["scan_id"].astype(str).to_numpy(), scan_patient.astype(np.int64), scan_time),
    )


def _birth_times(
    name: str,
    patients: np.ndarray,
    patient: np.ndarray,
    time: np.ndarray,
    codes: np.ndarray,
    first: np.ndarray,
) -> np.ndarray:
    """(P,) record start: the ``MEDS_BIRTH`` time where a patient has one, else the first event; raises for
    an event before its patient's birth."""
    start = first.copy()
    is_birth = codes == BIRTH_CODE
    if not is_birth.any():
        return start
    birth = pd.Series(time[is_birth]).groupby(patient[is_birth]).min()
    start[birth.index.to_numpy()] = birth.to_numpy()
    early = np.flatnonzero(time < start[patient])
    if early.size:
        row = int(early[0])
        raise TTEInputError(
            f"{name}: row {row}: event {codes[row]!r} at {time[row]:g} days is before the first record of "
            f"patient {_shown(patients[patient[row]])} ({BIRTH_CODE} at {start[patient[row]]:g} days); "
            "expected every event at or after the patient's first record"
        )
    return start
