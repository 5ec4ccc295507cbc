"""The sidecar contract from the shared fixtures in tests/golden/sidecar/: the Python reader must give the verdict
(and the message fragments) that the manifest states; the C++ unit tests read the same manifest and files
(export/cpp/tests/unit_tests.cpp: sidecar_fixtures, compatibility_fixtures)."""
import json
import logging
from pathlib import Path

import pytest

from export.sidecar import PlanMismatchError, SidecarError, check_compatible, read_sidecar

FIXTURES = Path(__file__).parent / 'golden' / 'sidecar'
MANIFEST = json.loads((FIXTURES / 'manifest.json').read_text())


def test_manifest_lists_every_fixture_with_the_verdict_its_name_says() -> None:
    listed = [entry['file'] for entry in MANIFEST['parse']]
    assert sorted(listed) == sorted(p.name for p in FIXTURES.glob('*.json') if p.name != 'manifest.json')
    for entry in MANIFEST['parse']:
        assert entry['verdict'] == entry['file'].split('_')[0] and entry['verdict'] in ('accept', 'refuse')
        assert entry['verdict'] == 'accept' or entry['message'], entry['file']
    assert {e['verdict'] for e in MANIFEST['compatibility']} == {'accept', 'warn', 'refuse'}


@pytest.mark.parametrize('entry', MANIFEST['parse'], ids=lambda e: e['file'])
def test_python_reader_gives_the_manifest_verdict(entry: dict) -> None:
    path = FIXTURES / entry['file']
    if entry['verdict'] == 'accept':
        sidecar = read_sidecar(FIXTURES / 'unused.plan', path)
        assert sidecar.profile.as_dict() == {'min': 1, 'opt': 64, 'max': 256}
        assert sidecar.activation in ('softmax', 'none') and sidecar.model == 'inception_v4_pcam'
        return
    with pytest.raises(SidecarError) as error:
        read_sidecar(FIXTURES / 'unused.plan', path)
    message = str(error.value)
    assert str(path) in message
    for fragment in entry['message']:
        assert fragment in message, f'{entry["file"]}: {message!r} lacks {fragment!r}'


@pytest.mark.parametrize('case', MANIFEST['compatibility'],
                         ids=lambda c: f'{c["sidecar"]}-{c["tensorrt"]}-{c["gpu"]["name"]}')
def test_python_compatibility_rules(case: dict, caplog: pytest.LogCaptureFixture) -> None:
    sidecar = read_sidecar(FIXTURES / 'unused.plan', FIXTURES / case['sidecar'])
    if case['verdict'] == 'refuse':
        with pytest.raises(PlanMismatchError) as error:
            check_compatible(sidecar, case['tensorrt'], case['gpu'])
        text = str(error.value)
    else:
        with caplog.at_level(logging.WARNING, logger='export.sidecar'):
            warning = check_compatible(sidecar, case['tensorrt'], case['gpu'])
        assert (warning is not None) == (case['verdict'] == 'warn')
        text = caplog.text if warning else ''
    for fragment in case['message']:
        assert fragment in text, f'{text!r} lacks {fragment!r}'



def test_cmake_and_python_share_the_tensorrt_floor() -> None:
    import re

    from export.gpu import TENSORRT_MAJOR

    cmake = (Path(__file__).parents[1] / 'export' / 'cpp' / 'CMakeLists.txt').read_text()
    floors = re.findall(r'_trt_MAJOR LESS (\d+)', cmake)
    assert floors == [str(TENSORRT_MAJOR)]
    assert f'TensorRT >= {TENSORRT_MAJOR}' in cmake
