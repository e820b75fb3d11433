"""Routing rules (pure functions): AE checks, match conditions, first match wins, fallback."""
from __future__ import annotations

from pydicom.multival import MultiValue

from dicom_node.config import RouteSettings
from dicom_node.routing import (
    ACCEPT,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    RouteChoice,
    association_verdict,
    fallback_route,
    match_keywords,
    matches,
    select_route,
)

ROUTES = [
    RouteSettings(called_ae="KIM", model="soft", destinations=["pacs"], calling_ae=["CR_ROOM1", "DX_ROOM2"],
                  match={"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST"]}, forward_original=True),
    RouteSettings(called_ae="KIM", model="sharp", destinations=["pacs"], calling_ae=["CR_ROOM1"],
                  match={"Modality": ["CR"]}),
    RouteSettings(called_ae="LEE", model="soft", destinations=["outbox"]),
    RouteSettings(called_ae="PARK", model="soft", destinations=["outbox"], calling_ae=["ONLY_ME"],
                  match={"Modality": ["MG"]}),
]


def test_association_verdicts():
    assert association_verdict(ROUTES, "KIM", "CR_ROOM1") == ACCEPT
    assert association_verdict(ROUTES, " KIM ", "DX_ROOM2") == ACCEPT  # AE titles are space padded
    assert association_verdict(ROUTES, "NOBODY", "CR_ROOM1") == REJECT_CALLED_AE
    assert association_verdict(ROUTES, "KIM", "EVIL") == REJECT_CALLING_AE
    assert association_verdict(ROUTES, "LEE", "ANYONE") == ACCEPT  # no allow-list
    assert association_verdict(ROUTES, "kim", "CR_ROOM1") == REJECT_CALLED_AE  # AE titles are exact


def test_first_matching_route_wins():
    chest_cr = {"Modality": "CR", "BodyPartExamined": "CHEST"}
    assert select_route(ROUTES, "KIM", "CR_ROOM1", chest_cr) == RouteChoice(0, True)
    # not a chest: the first route fails, the second (CR only) matches
    assert select_route(ROUTES, "KIM", "CR_ROOM1", {"Modality": "CR", "BodyPartExamined": "HAND"}) == RouteChoice(1, True)
    # DX_ROOM2 is not allowed on route 1: unmatched, fallback is route 0 (first allowed)
    assert select_route(ROUTES, "KIM", "DX_ROOM2", {"Modality": "CR", "BodyPartExamined": "HAND"}) == RouteChoice(0, False)
    assert select_route(ROUTES, "LEE", "X", {}) == RouteChoice(2, True)  # no conditions: everything
    assert select_route(ROUTES, "NOBODY", "X", chest_cr) == RouteChoice(None, False)


def test_match_semantics():
    assert matches({"Modality": ["cr"]}, {"Modality": "CR "})  # case-insensitive, stripped
    assert not matches({"Modality": ["CR"]}, {"Modality": "CT"})
    assert not matches({"Modality": ["CR"]}, {})  # missing never matches...
    assert matches({"BodyPartExamined": ["CHEST", ""]}, {})  # ...unless "" is accepted
    assert matches({"BodyPartExamined": ["CHEST", ""]}, {"BodyPartExamined": ""})
    image_type = MultiValue(str, ["ORIGINAL", "PRIMARY"])
    assert matches({"ImageType": ["PRIMARY"]}, {"ImageType": image_type})  # any value of a multi-valued element
    assert not matches({"ImageType": ["DERIVED"]}, {"ImageType": image_type})
    # all keywords must hold
    assert not matches({"Modality": ["CR"], "BodyPartExamined": ["CHEST"]}, {"Modality": "CR", "BodyPartExamined": "HAND"})


def test_fallback_forward_original_only_from_that_route():
    assert fallback_route(ROUTES, RouteChoice(0, False)) is ROUTES[0]  # forward_original true
    assert fallback_route(ROUTES, RouteChoice(3, False)) is None  # forward_original false: keep only
    assert fallback_route(ROUTES, RouteChoice(0, True)) is None  # matched: not a fallback
    assert fallback_route(ROUTES, RouteChoice(None, False)) is None


def test_match_keywords_lists_what_the_scp_must_read():
    assert match_keywords(ROUTES) == {"Modality", "BodyPartExamined"}
