"""Every notebook in experiments/notebooks runs top to bottom with its small settings."""

import glob
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'experiments', 'notebooks', '*.ipynb')))


def test_the_three_notebooks_are_there():
  assert [os.path.basename(p) for p in NOTEBOOKS] == [
      'feature_reuse.ipynb', 'parameter_efficiency.ipynb', 'quickstart.ipynb']


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_with_small_settings(path, tmp_path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert all(not cell.outputs and cell.execution_count is None for cell in code), (
      'commit notebooks without outputs')
  # The kernel and its subprocesses inherit the environment (conftest.py's too): small settings,
  # fresh runs and data, one CPU device.
  monkeypatch.setenv('DENSENET_JAX_SMALL', '1')
  monkeypatch.setenv('DENSENET_JAX_RUNS', str(tmp_path / 'runs'))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '1')
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': os.path.dirname(path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
  images = [output for cell in code for output in cell.outputs
            if 'image/png' in output.get('data', {})]
  assert images, 'the notebook drew no figure'
