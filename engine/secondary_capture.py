"""The Secondary Capture writer: a translated image as a new series of the source's study.

Built on ``highdicom.sc.SCImage`` (a correct SC skeleton), then completed with what the PACS
and the radiologist need: the source's patient/study attributes verbatim, deterministic UIDs
(a resend after a crash replaces rather than duplicates at the PACS), a reference to the
source instance, the equipment and model that made it, spacing, laterality, orientation and
a display window. Every output is validated with ``dciodvfy`` in the tests.
"""
from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from .defaults import CAUTION_LABEL, FLAGGED_PREFIX, MANUFACTURER
from .dicom_decode import transfer_syntax
from .version import __version__

if TYPE_CHECKING:
    from .fidelity import FidelityReport
    from .model_file import StyleModel

__all__ = ["derived_uid", "device_uid", "make_secondary_capture", "SERIES_NUMBER_OFFSET", "FLAGGED_SERIES_OFFSET",
           "DERIVATION_CODE", "SeriesNaming"]

# A name-based (SHA-1, RFC 4122 version 5) UUID namespace for dicom-node output UIDs.
_UID_NAMESPACE = uuid.UUID("6f1c2d4e-3b7a-5c8d-9e0f-a1b2c3d4e5f6")
# Derivation code (value, private coding scheme, meaning) for "image style translation".
DERIVATION_CODE = ("STYLE", "99DCMNODE", "Image style translation")
# Output series number = source series number + this (deterministic, clearly "derived").
SERIES_NUMBER_OFFSET = 1000
# Flagged outputs form a series of their own (series-level attributes stay consistent), numbered
# source series number + this.
FLAGGED_SERIES_OFFSET = 2000

# Patient, Patient Study, General Study and Clinical Trial attributes copied verbatim, so the
# output files under exactly the same patient and study as the source at the PACS.
_COPIED_KEYWORDS = (
    "SpecificCharacterSet",
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence",
    "OtherPatientNames", "EthnicGroup", "PatientComments", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
    "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "QualityControlSubject",
    # Patient Study
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight", "PatientSexNeutered",
    "Occupation", "AdditionalPatientHistory", "PregnancyStatus",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    "RequestingService",
    # Clinical Trial Subject / Study
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    # Series/image attributes that still describe the translated image
    "BodyPartExamined", "PatientPosition", "BurnedInAnnotation", "RecognizableVisualFeatures",
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
    # Not in the SC IOD (dciodvfy: a warning, "standard extended"), but chest hanging
    # protocols sort PA/AP/LAT by it, so a radiologist's layout keeps working.
    "ViewPosition",
)
# Body Part Examined values that are not paired structures: there Laterality (Type 2C) must be
# absent, elsewhere present (empty when unknown). This is exactly the set dciodvfy enforces
# (measured with dciodvfy against the CID 4031 values).
_UNPAIRED_BODY_PARTS = frozenset("""
ABDOMEN ABDOMENPELVIS AORTA BACK BLADDER BRAIN CEREBELLUM CERVIX CHEST CHESTABDOMEN CHESTABDPELVIS
CIRCLEOFWILLIS COCCYX COLON CORONARYARTERY CSPINE CTSPINE DUODENUM ESOPHAGUS FACE GALLBLADDER HEAD
HEADNECK HEART ILEUM ILIUM JAW JEJUNUM LARYNX LIVER LSPINE LSSPINE MAXILLA MEDIASTINUM MOUTH NECK
NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE PANCREAS PELVIS PENIS PHARYNX PROSTATE RECTUM SCALP
SKULL SPINE SPLEEN SSPINE STERNUM STOMACH THYMUS THYROID TONGUE TRACHEA TSPINE TLSPINE URETER URETHRA
UTERUS VAGINA VULVA WHOLEBODY
""".split())
_LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203",
}


def _text(value: object, limit: int = 64) -> str:
    """Free text made safe for an LO/SH-like value: no backslash (the DICOM value separator), no
    control characters, at most ``limit`` characters. Model names come from model files."""
    cleaned = "".join(" " if (c == "\\" or ord(c) < 32) else c for c in str(value))
    return cleaned.strip()[:limit]


def derived_uid(*parts: str) -> str:
    """A deterministic UID from its inputs (e.g. source UID + model identity).

    ``2.25.<decimal UUID>`` with a name-based UUID: globally unique without a registered root,
    and the same inputs always give the same UID (idempotent resends).
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def device_uid(model: "StyleModel") -> str:
    """The DeviceUID of a style model: derived from its weight digest, so it changes exactly
    when the model is retrained (IHE AI Results: the algorithm is the device)."""
    return derived_uid("dicom-node style model weights", model.weights_sha256 or model.identity)


@dataclass(frozen=True)
class SeriesNaming:
    """How the caller (the node: one per route) names the output series; None fields keep the
    defaults (``dicom-node translate``: "<style> style: <source description>", source + 1000).

    ``description``: SeriesDescription (cut to 64 characters, after the flagged prefix).
    ``numbers``: (SeriesNumber, SeriesNumber of the flagged series).
    ``key``: the series' identity instead of the model's: SeriesInstanceUID = derived_uid(source
    series UID, key), so a retrained model's outputs stay in the same series; the SOP Instance
    UID then also depends on it (two routes with one model never share an instance UID).
    ``version``: the output version (``dicom-node reprocess``); from 2 on the SOP Instance UID
    is a new one, so a PACS stores the re-translated image instead of ignoring a duplicate.
    """

    description: str | None = None
    numbers: tuple[int, int] | None = None
    key: str | None = None
    version: int = 1


def _series_number(source: Dataset, offset: int = SERIES_NUMBER_OFFSET) -> int:
    try:
        base = int(source.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        base = 0
    return (base % 1_000_000) + offset


def _instance_number(source: Dataset) -> int:
    try:
        return int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1


def _spacing_pair(value: Any) -> list[float] | None:
    try:
        pair = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return pair if len(pair) == 2 and all(v > 0 for v in pair) else None


def _set_pixel_spacing(sc: Dataset, source: Dataset) -> None:
    """Carry the source's spacing over so measurements on the output match the source.

    - PixelSpacing (with its calibration, if any) is copied as is.
    - Only ImagerPixelSpacing (detector plane, typical for CR/DX): divided by the Estimated
      Radiographic Magnification Factor when the source has one (calibration GEOMETRY, as
      DX does), otherwise copied as PixelSpacing, which is what viewers measure with on the
      source anyway (the SC IOD has no Imager Pixel Spacing).
    """
    from pydicom.valuerep import DS

    pixel = _spacing_pair(source.get("PixelSpacing"))
    if pixel is not None:
        sc.PixelSpacing = copy.deepcopy(source.PixelSpacing)
        if source.get("PixelSpacingCalibrationType"):
            sc.PixelSpacingCalibrationType = source.PixelSpacingCalibrationType
            sc.PixelSpacingCalibrationDescription = _text(source.get("PixelSpacingCalibrationDescription")
                                                           or "as calibrated in the source image")
        return
    imager = _spacing_pair(source.get("ImagerPixelSpacing"))
    if imager is not None:
        try:
            magnification = float(source.get("EstimatedRadiographicMagnificationFactor") or 0)
        except (TypeError, ValueError):
            magnification = 0.0
        if magnification > 0:
            sc.PixelSpacing = [DS(v / magnification, auto_format=True) for v in imager]
            sc.PixelSpacingCalibrationType = "GEOMETRY"
            sc.PixelSpacingCalibrationDescription = "Imager Pixel Spacing / Est. Radiographic Magnification"
        else:
            sc.PixelSpacing = copy.deepcopy(source.ImagerPixelSpacing)
        return
    nominal = _spacing_pair(source.get("NominalScannedPixelSpacing"))
    if nominal is not None:
        sc.PixelSpacing = copy.deepcopy(source.NominalScannedPixelSpacing)


def _laterality(source: Dataset) -> str:
    """Series Laterality (R/L) from Laterality, else Image/Frame Laterality; empty when unknown."""
    for kw in ("Laterality", "ImageLaterality"):
        value = str(source.get(kw, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return ""


def _ds(value: float) -> str:
    """A Decimal String (at most 16 characters) for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _style_label(model: "StyleModel") -> str:
    return str(model.metadata.get("style") or model.name)


def make_secondary_capture(source: Dataset, pixels: np.ndarray, model: "StyleModel", *,
                           window: tuple[float, float], rescale: tuple[float, float] | None = None,
                           label: str | None = CAUTION_LABEL,
                           fidelity: "FidelityReport | None" = None, show_flag: bool = True,
                           series: SeriesNaming | None = None) -> Dataset:
    """The Secondary Capture dataset for ``pixels`` (uint16 MONOCHROME2) derived from ``source``.

    UIDs: SeriesInstanceUID = derived_uid(source series UID, model identity) and
    SOPInstanceUID = derived_uid(source SOP UID, model identity). Explicit VR Little Endian.

    ``label`` (the caution, None or "" for none) opens ImageComments.  An output the fidelity
    guard flagged, with ``show_flag``, goes to a series of its own (derived from the same UIDs
    plus "flagged", number + :data:`FLAGGED_SERIES_OFFSET`) whose SeriesDescription starts with
    :data:`FLAGGED_PREFIX`; ImageComments names the reasons and scores.

    ``window`` (center, width) is in output values; ``rescale`` (intercept, slope) is written as
    the Modality LUT when the stored pixels are not the output values themselves
    (``engine.radiograph.OutputScale``).  ``series``: the caller's naming (:class:`SeriesNaming`).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ValueError("pixels must be a 2-D uint16 array")
    identity = model.identity
    flagged = bool(show_flag and fidelity is not None and fidelity.flagged)
    naming = series or SeriesNaming()
    flag_part = ["fidelity-flagged"] if flagged else []
    if naming.key is None:
        series_uid = derived_uid(str(source.SeriesInstanceUID), identity, *flag_part)
        sop_parts = [identity]
    else:
        series_uid = derived_uid(str(source.SeriesInstanceUID), "series", naming.key, *flag_part)
        sop_parts = [identity, naming.key]
    if naming.version > 1:
        sop_parts.append(f"output version {naming.version}")
    sop_uid = derived_uid(str(source.SOPInstanceUID), *sop_parts)
    style = _style_label(model)
    if naming.numbers is None:
        series_number = _series_number(source, FLAGGED_SERIES_OFFSET if flagged else SERIES_NUMBER_OFFSET)
    else:
        series_number = int(naming.numbers[1] if flagged else naming.numbers[0])
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_text(f"style model {model.name}"),
        software_versions=[_text(f"dicom-node {__version__}"), _text(f"model {model.name} {model.version}")],
        contribution_description=_text(f"Image style translation, model {model.name} {model.version}", 1024),
    )
    # PATIENT coordinates need an orientation to construct; the source's value (possibly
    # empty, which is allowed) is set verbatim right after.
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=16,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[equipment],
        series_description=_text(f"{style} style"),
        manufacturer_model_name=MANUFACTURER,
        software_versions=f"dicom-node {__version__}",
    )
    for kw in _COPIED_KEYWORDS:
        if kw in source:
            sc[kw] = copy.deepcopy(source[kw])
        elif kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            setattr(sc, kw, None)  # Type 2: present, empty (highdicom may not have set them)

    # Series: description naming the style, modality as the source (hanging protocols match it).
    source_desc = str(source.get("SeriesDescription", "") or "").strip()
    description = naming.description if naming.description is not None else (
        f"{style} style: {source_desc}" if source_desc else f"{style} style")
    sc.SeriesDescription = _text((FLAGGED_PREFIX if flagged else "") + description)
    if source.get("Modality"):
        sc.Modality = source.Modality
    body_part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    if body_part in _UNPAIRED_BODY_PARTS:
        if "Laterality" in sc:
            del sc.Laterality
    else:
        sc.Laterality = _laterality(source)  # Type 2C: present for paired/unknown parts; empty = unknown
    # (highdicom annotates it list[str]; pydicom writes None as the empty Type 2 value)
    sc.PatientOrientation = copy.deepcopy(source.PatientOrientation) if "PatientOrientation" in source else None  # type: ignore[assignment]

    # SC Equipment: made by software on a workstation, not captured from a digital interface.
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = MANUFACTURER
    sc.SecondaryCaptureDeviceSoftwareVersions = _text(__version__)

    # Image: derived, with its provenance.
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (f"Image style translated by dicom-node {__version__} with style model "
                                f"'{model.name}' version {model.version} "
                                f"(direction {model.metadata.get('direction', '?')}, "
                                f"sha256 {str(model.metadata.get('sha256', ''))[:16]})")[:1024]
    # CID 7203 (Image Derivation, extensible) has no code for a style translation; a private
    # coding scheme (99...) is what the standard provides for that (dciodvfy: a warning only).
    derivation = Dataset()
    derivation.CodeValue = DERIVATION_CODE[0]
    derivation.CodingSchemeDesignator = DERIVATION_CODE[1]
    derivation.CodeMeaning = DERIVATION_CODE[2]
    sc.DerivationCodeSequence = Sequence([derivation])
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue = codes.DCM.SourceImageForImageProcessingOperation.value
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = codes.DCM.SourceImageForImageProcessingOperation.meaning
    ref.PurposeOfReferenceCodeSequence = Sequence([purpose])
    sc.SourceImageSequence = Sequence([ref])
    # highdicom adds an item of its own: ours is the one naming dicom-node and the model
    item = next(i for i in sc.ContributingEquipmentSequence if i.get("Manufacturer") == MANUFACTURER)
    item.DeviceUID = device_uid(model)
    item.DeviceSerialNumber = _text(model.weights_sha256[:16] or "unknown")
    comments = [label.strip()] if label and label.strip() else []
    if flagged and fidelity is not None:
        comments.append(f"Fidelity guard: {fidelity.summary()}")
    if comments:
        sc.ImageComments = _text(" ".join(comments), 10240)
    previous = source.get("ContributingEquipmentSequence")
    if previous:
        sc.ContributingEquipmentSequence = Sequence(  # type: ignore[assignment]  # highdicom annotates a list of its own items; pydicom stores any Sequence
            [copy.deepcopy(item) for item in previous] + list(sc.ContributingEquipmentSequence))

    if str(source.get("LossyImageCompression", "")) == "01" or transfer_syntax(source) in _LOSSY_TRANSFER_SYNTAXES:
        # Derived from lossy-compressed pixels: say so (the standard requires it to propagate).
        sc.LossyImageCompression = "01"
        for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if kw in source:
                sc[kw] = copy.deepcopy(source[kw])

    _set_pixel_spacing(sc, source)

    if rescale is not None:
        intercept, slope = rescale
        sc.RescaleIntercept = _ds(intercept)
        sc.RescaleSlope = _ds(slope)
        sc.RescaleType = "US"  # unspecified: the target domain's own units
    center, width = window
    sc.WindowCenter = f"{center:.1f}"
    sc.WindowWidth = f"{width:.1f}"
    sc.WindowCenterWidthExplanation = _text(f"{style} style")
    sc.VOILUTFunction = "LINEAR"
    return sc

