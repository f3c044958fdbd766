"""Nothing lost, nothing silently wrong (docs/reliability.md): bad values
refused before any work, mimjax-convert never deletes what it did not
write, stage fingerprints, checkpoint checksums with fallback. Most cases
validate without training; three tiny pre-training runs cover the rest."""

import json
import os
import shutil

import numpy as np
import pytest

from mimjax import checkpoint, convert, torch_io
from mimjax import config as config_lib
from mimjax import main as main_lib
from mimjax.training import pipeline
import damage
from tiny_config import tiny_config

import test_convert as tc  # the tiny state dict (and its inverse mapping)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _one_line(error):
  message = str(error.value)
  assert '\n' not in message, message
  return message


# ------------------------------------------ refused before any work starts


@pytest.mark.parametrize('key, value, message', [
    ('finetune.batch_size', 0, 'finetune.batch_size must be at least 1'),
    ('pretrain.batch_size', 0, 'pretrain.batch_size must be at least 1'),
    ('linprobe.batch_size', -8, 'linprobe.batch_size must be at least 1'),
    ('eval_batch_size', 0, 'eval_batch_size must be at least 1'),
    ('data.name', 'digitz', "unknown dataset data.name='digitz'; did you "
     "mean 'digits'"),
    ('pretrain.data.name', 'cifar11', "did you mean 'cifar10'"),
    ('data.name', 'folder:/nonexistent/images', 'no directory at'),
    ('log_every', 0, r'log_every must be at least 1'),
    ('checkpoint_every', 0, 'checkpoint_every must be at least 1'),
    ('keep_checkpoints', 0, 'keep_checkpoints must be at least 1'),
    ('pretrain.steps', -5, r'pretrain.steps must be >= 0, got -5'),
    ('finetune.epochs', -1, 'finetune.epochs must be >= 0'),
    ('linprobe.warmup_steps', -1, 'linprobe.warmup_steps must be >= 0'),
    ('finetune.eval_every', -1, 'finetune.eval_every must be >= 0'),
    ('stop_at_step', -1, 'stop_at_step must be >= 0'),
    ('pretrain.accumulate', 0, 'pretrain.accumulate must be at least 1'),
    ('finetune.accumulate', 3, 'finetune.batch_size 32 is not divisible by '
     'finetune.accumulate 3 x the data-parallel size 1'),
    ('finetune.init', '/nonexistent/run', 'finetune.init=/nonexistent/run: no '
     'such file or directory'),
])
def test_refused_by_validate_in_one_line(data_dir, key, value, message):
  c = tiny_config(data_dir, mode='pipeline')
  c.update_from_flattened_dict({key: value})
  with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
    config_lib.validate(c, num_devices=1)
  _one_line(error)


def test_a_stage_that_trains_nothing_is_refused(data_dir):
  c = tiny_config(data_dir, mode='pretrain')
  c.pretrain.update(dict(steps=0, epochs=0))
  with pytest.raises(ValueError, match='pretrain would train nothing'):
    config_lib.validate(c, num_devices=1)
  c.mode = 'finetune'  # pre-training does not run: its lengths do not matter
  config_lib.validate(c, num_devices=1)


def test_mask_ratio_must_leave_a_visible_patch(data_dir):
  c = tiny_config(data_dir, mode='pretrain')
  c.pretrain.data.image_size = 32  # 8 x 8 = 64 patches of 4
  c.pretrain.mask_ratio = 0.99
  with pytest.raises(ValueError, match=r'pretrain.mask_ratio=0.99 leaves no '
                     r'patch visible of the 64 in a 32x32 image') as error:
    config_lib.validate(c, num_devices=1)
  _one_line(error)
  for mask in ('complementary', 'independent', 'block'):
    c.pretrain.mask = mask
    c.pretrain.objective = 'mae' if mask == 'block' else 'siamese'
    with pytest.raises(ValueError, match='leaves no patch visible'):
      config_lib.validate(c, num_devices=1)
  c.pretrain.update(dict(mask='random', objective='mae', mask_ratio=0.98))
  config_lib.validate(c, num_devices=1)  # int(64 * 0.02) = 1 patch


def test_pipeline_refuses_before_anything_is_written(tmp_path, data_dir):
  c = tiny_config(data_dir, mode='pipeline')
  c.finetune.batch_size = 0  # used to be a ZeroDivisionError after pretrain
  with pytest.raises(ValueError, match='finetune.batch_size must be at least'):
    pipeline.run(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_a_bad_folder_is_refused_before_anything_is_written(tmp_path,
                                                          data_dir):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  flat = tmp_path / 'flat'  # images, no class sub-folders: no fine-tuning
  flat.mkdir()
  for i in range(4):
    Image.new('RGB', (8, 8), (i, 0, 0)).save(flat / f'{i}.png')
  broken = tmp_path / 'broken' / 'cat'  # no readable image
  broken.mkdir(parents=True)
  (broken / 'a.jpg').write_bytes(b'not a jpeg')
  (tmp_path / 'empty').mkdir()
  for root, mode, message, workdir in (
      (flat, 'pipeline', 'no class sub-folders', 'run'),
      (broken.parent, 'pretrain', 'no readable', 'run'),
      (flat, 'finetune', 'no class sub-folders', 'empty')):
    c = tiny_config(data_dir, mode=mode)
    c.data.name = c.pretrain.data.name = f'folder:{root}'
    with pytest.raises(ValueError, match=message) as error:
      pipeline.run(c, str(tmp_path / workdir))
    _one_line(error)
    assert not os.path.exists(tmp_path / 'run')
    assert not os.listdir(tmp_path / 'empty')


def test_one_image_photo_that_is_not_an_image_or_too_small(tmp_path,
                                                           data_dir):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  c = tiny_config(data_dir, mode='pretrain')
  c.pretrain.data.name = 'one_image'
  text = tmp_path / 'photo.jpg'
  text.write_text('not a photo')
  c.pretrain.data.one_image_path = str(text)
  with pytest.raises(ValueError, match=r'pretrain.data.one_image_path: .*'
                     r'photo.jpg is not an image PIL can read') as error:
    config_lib.validate(c, num_devices=1)
  _one_line(error)
  tiny = tmp_path / 'dot.png'
  Image.new('RGB', (1, 1), (200, 10, 10)).save(tiny)
  c.pretrain.data.one_image_path = str(tiny)
  with pytest.raises(ValueError, match=r'is 1x1 pixels, smaller than one 4x4 '
                     'patch'):
    config_lib.validate(c, num_devices=1)
  fine = tmp_path / 'photo.png'
  Image.new('RGB', (40, 30), (200, 10, 10)).save(fine)
  c.pretrain.data.one_image_path = str(fine)
  config_lib.validate(c, num_devices=1)
  # The builder itself (a data config used outside main) says it in a line.
  from mimjax.data import builders  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='is not an image PIL can read'):
    builders.load_photo(str(text))


def test_config_datasets_are_the_pipelines():
  from mimjax.data import pipeline  # pylint: disable=g-import-not-at-top
  assert set(config_lib.DATASETS) == set(pipeline.TFDS_NAMES)


def _fake_run(root, stages=('pretrain', 'finetune')):
  """A run's directory layout: <root>/<stage>/checkpoints/<step>/."""
  for stage in stages:
    os.makedirs(root / stage / 'checkpoints' / '40' / 'state')
  return root


def test_init_may_be_a_run_root_or_a_stage_dir(tmp_path, data_dir):
  run = _fake_run(tmp_path / 'run')
  expected = str(run / 'pretrain' / 'checkpoints')
  for given in (run, run / 'pretrain', run / 'pretrain' / 'checkpoints'):
    assert checkpoint.find_init(str(given)) == expected
  c = tiny_config(data_dir, mode='finetune')
  c.finetune.init = str(run)
  config_lib.validate(c, num_devices=1)
  # Without pre-training, the path to use is named.
  other = _fake_run(tmp_path / 'other', stages=('finetune',))
  with pytest.raises(ValueError, match=r'is a run directory without '
                     r'pre-training; name the checkpoints to use, e\.g\. '
                     r'.*other/finetune/checkpoints'):
    checkpoint.find_init(str(other), 'finetune.init')
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  with pytest.raises(FileNotFoundError, match='holds no checkpoint yet'):
    checkpoint.find_init(str(tmp_path / 'empty'))
  os.makedirs(tmp_path / 'nothing')
  with pytest.raises(ValueError, match='holds no checkpoint: give'):
    checkpoint.find_init(str(tmp_path / 'nothing'))


def test_workdir_under_a_file_or_not_writable(tmp_path, data_dir):
  c = tiny_config(data_dir, mode='pretrain')
  afile = tmp_path / 'afile'
  afile.write_text('x')
  with pytest.raises(ValueError, match=r'workdir .*afile/run: .*afile is a '
                     'file, not a directory'):
    pipeline.run(c, str(afile / 'run'))
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
    try:
      with pytest.raises(ValueError, match='is not writable'):
        config_lib.check_workdir(str(locked / 'run'))
    finally:
      locked.chmod(0o755)


def test_typo_and_missing_recipe_are_one_line(capsys, monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  recipe = os.path.join(os.path.dirname(__file__), 'tiny_config.py')

  def parse(*argv):  # config_flags reads its overrides from sys.argv
    monkeypatch.setattr('sys.argv', ['mimjax', *argv])
    with pytest.raises(SystemExit):
      main_lib.parse_flags(['mimjax', *argv])

  try:
    parse(f'--config={recipe}', '--workdir=/tmp/x',
          '--config.pretrain.bach_size=8')
    err = capsys.readouterr().err.strip()
    assert err == ("mimjax: error: unknown config key 'bach_size': Did you "
                   'mean "batch_size" instead of "bach_size"?'), err
    parse('--config=/nonexistent/recipe.py', '--workdir=/tmp/x')
    err = capsys.readouterr().err.strip()
    assert err == ('mimjax: error: cannot load --config: [Errno 2] No such '
                   "file or directory: '/nonexistent/recipe.py'"), err
  finally:
    flags.FLAGS.unparse_flags()


def test_user_code_keeps_its_traceback_mimjax_refusals_are_one_line(
    capsys, monkeypatch):
  """main: mimjax.errors are one line and exit 1; a ValueError from a
  researcher's own code (here, raised inside the run) propagates whole."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mimjax import errors  # pylint: disable=g-import-not-at-top
  from mimjax.training import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from mimjax.training import preemption  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(preemption, 'install', lambda: None)  # keep pytest's
  recipe = os.path.join(os.path.dirname(__file__), 'tiny_config.py')
  argv = ['mimjax', f'--config={recipe}', '--workdir=/tmp/x']
  monkeypatch.setattr('sys.argv', argv)
  main_lib.parse_flags(argv)
  try:
    def refuse(*args):
      raise errors.Invalid('pretrain.batch_size 7 is odd\nsecond line')
    monkeypatch.setattr(pipeline_lib, 'run', refuse)
    with pytest.raises(SystemExit) as exit_info:
      main_lib.main([])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        'mimjax: error: pretrain.batch_size 7 is odd')

    def users_loss(*args):
      raise ValueError('my loss: shapes (8, 64) and (8, 48) differ')
    monkeypatch.setattr(pipeline_lib, 'run', users_loss)
    with pytest.raises(ValueError, match=r'my loss: shapes'):
      main_lib.main([])
  finally:
    flags.FLAGS.unparse_flags()


# --------------------------------------------------------- mimjax-convert


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """The tiny (ViT-mu, patch 4) MAE state dict as an .npz file."""
  sd = tc.to_mae_state_dict(tc.random_like(tc.mae_shapes(posemb='learn')))
  path = tmp_path_factory.mktemp('weights') / 'mae_mu.npz'
  torch_io.save_npz_state_dict(path, sd)
  return path


def _convert(src, out, *extra):
  return convert.main([str(src), str(out), '--model', 'mu',
                       '--decoder_heads', '4', *extra])


def test_convert_never_deletes_what_it_did_not_write(tmp_path, weights):
  out = tmp_path / 'out'
  out.mkdir()
  src = out / 'mae_mu.npz'  # the source sits in OUT
  shutil.copy(weights, src)
  with pytest.raises(ValueError, match='exists and is not empty; choose '
                     'another directory, or --overwrite') as error:
    _convert(src, out)
  _one_line(error)
  with pytest.raises(ValueError, match=r'holds mae_mu.npz, which mimjax did '
                     'not write'):
    _convert(src, out, '--overwrite')
  assert sorted(os.listdir(out)) == ['mae_mu.npz']
  # A previous conversion is replaced with --overwrite, and only then.
  fresh = tmp_path / 'fresh'
  assert _convert(weights, fresh) == 0
  with pytest.raises(ValueError, match='exists and is not empty'):
    _convert(weights, fresh)
  assert _convert(weights, fresh, '--overwrite') == 0
  checkpoint.load_params(str(fresh))
  # A file dropped into a converted directory is not deleted either.
  (fresh / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='holds notes.txt, which mimjax did'):
    _convert(weights, fresh, '--overwrite')
  assert (fresh / 'notes.txt').read_text() == 'mine'


def test_convert_command_line_error_is_one_line(tmp_path, weights, capsys,
                                                monkeypatch):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  monkeypatch.setattr('sys.argv', ['mimjax-convert', str(weights), str(out),
                                   '--model', 'mu'])
  assert convert.main() == 1
  err = capsys.readouterr().err
  assert err.startswith('mimjax-convert: error: ') and err.count('\n') == 1


def test_convert_refuses_weights_of_another_preset(tmp_path, weights):
  with pytest.raises(ValueError, match=r'the weights are a ViT of width 64 and '
                     r'depth 2 \(patch_embed.proj.weight has shape '
                     r'\(64, 3, 4, 4\)\), but --model=nano is width 128, '
                     r'depth 4, 4 heads; use --model=mu') as error:
    convert.main([str(weights), str(tmp_path / 'a'), '--model', 'nano'])
  _one_line(error)
  with pytest.raises(ValueError, match=r'patch size 4 .*\(64, 3, 4, 4\)\), '
                     'not 16'):
    _convert(weights, tmp_path / 'b', '--patch_size', '16')
  with pytest.raises(ValueError, match=r'decoder has width 32 \(decoder_embed'
                     r'.weight has shape \(32, 64\)\), which '
                     r'--decoder_heads=5 does not divide'):
    convert.main([str(weights), str(tmp_path / 'c'), '--model', 'mu',
                  '--decoder_heads', '5'])
  assert not any(os.path.exists(tmp_path / d) for d in 'abc')
  sd = torch_io.load_state_dict(str(weights))
  assert convert.describe(sd)['decoder_depth'] == 2
  hf = tc.to_hf_state_dict(sd, 4)
  assert {k: v for k, v in convert.describe(hf).items()
          if not k.endswith(('_key', '_shape'))} == dict(
              width=64, depth=2, patch_size=4, decoder_width=32,
              decoder_depth=2)


# ------------------------------------------------- fingerprints, checksums


def _pretrain_config(data_dir, **overrides):
  c = tiny_config(data_dir, mode='pipeline')
  c.pretrain.update(dict(steps=6, warmup_steps=1))
  c.update(dict(checkpoint_every=2, keep_checkpoints=5, stop_at_step=4))
  c.analyze.enabled = False
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, data_dir):
  """A pipeline stopped at step 4 of pre-training: checkpoints 2 and 4."""
  root = tmp_path_factory.mktemp('pretrained') / 'run'
  summaries = pipeline.run(_pretrain_config(data_dir), str(root))
  # An unfinished stage is nobody's init: the pipeline stops after it.
  assert [s['stage'] for s in summaries] == ['pretrain']
  assert sorted(os.listdir(root)) == ['config.json', 'log.txt', 'pretrain',
                                      'summary.json', 'summary.md']
  return root


def _copy(pretrained, tmp_path):
  return shutil.copytree(pretrained, tmp_path / 'run')


def _ckpts(run):
  return run / 'pretrain' / 'checkpoints'


def test_stage_resumes_only_with_its_own_settings(tmp_path, data_dir,
                                                  pretrained):
  run = _copy(pretrained, tmp_path)
  changed = _pretrain_config(data_dir, **{'pretrain.mask_ratio': 0.5,
                                          'pretrain.base_lr': 1e-3})
  with pytest.raises(ValueError) as error:
    pipeline.run(changed, str(run))
  assert _one_line(error) == (
      f'pretrain: the checkpoints in {_ckpts(run)} were written with other '
      'settings: pretrain.base_lr 0.002 -> 0.001; pretrain.mask_ratio 0.75 '
      '-> 0.5; start fresh with a new --workdir, or --config.overwrite=True '
      'to move them aside')
  other = _pretrain_config(data_dir, **{'pretrain.objective': 'rmae',
                                        'pretrain.mask': 'complementary'})
  with pytest.raises(ValueError, match=r"pretrain.mask 'random' -> "
                     r"'complementary'; pretrain.objective 'mae' -> 'rmae'"):
    pipeline.run(other, str(run))
  shorter = _pretrain_config(data_dir, **{'pretrain.steps': 3})
  with pytest.raises(ValueError, match=r'pretrain.steps 6 -> 3'):
    pipeline.run(shorter, str(run))
  # Nothing was written by the refused calls.
  assert sorted(os.listdir(run)) == ['config.json', 'log.txt', 'pretrain',
                                     'summary.json', 'summary.md']


def test_damaged_latest_checkpoint_falls_back(tmp_path, data_dir, pretrained,
                                              caplog):
  run = _copy(pretrained, tmp_path)
  for step in (2, 4):  # sealed when the next save or the end came
    assert checkpoint.verify(_ckpts(run) / str(step)) == (True, '')
  damage.flip_a_byte(_ckpts(run) / '4')
  with pytest.raises(ValueError, match=r'checkpoint step 4 in .* is damaged: '
                     r'.* does not match its checksum'):
    checkpoint.load_state_params(str(_ckpts(run)))
  # Allowed on resume: cadences, how far to go, how many to keep.
  resumed = _pretrain_config(data_dir, log_every=1, checkpoint_every=1,
                             keep_checkpoints=4, stop_at_step=5)
  caplog.set_level('INFO')
  pipeline.run(resumed, str(run))
  log = caplog.text
  assert 'checkpoint step 4 in' in log and 'is damaged' in log, log
  assert 'resuming from step 2, the newest checkpoint' in log, log
  assert 'pretrain: resumed from step 2' in log, log
  assert os.listdir(run / 'pretrain' / 'checkpoints_damaged') == ['4']
  assert checkpoint.latest_step(_ckpts(run)) == 5
  assert checkpoint.verify(_ckpts(run) / '5') == (True, '')
  # Each call's config has its own file; the first is untouched.
  assert json.loads((run / 'config.json').read_text())['stop_at_step'] == 4
  assert json.loads((run / 'config-2.json').read_text())['stop_at_step'] == 5


def test_no_checkpoint_verifies_is_one_line(tmp_path, data_dir, pretrained):
  run = _copy(pretrained, tmp_path)
  damage.flip_a_byte(_ckpts(run) / '4')
  os.remove(_ckpts(run) / '2' / 'state' / '_METADATA')
  with pytest.raises(ValueError) as error:
    pipeline.run(_pretrain_config(data_dir), str(run))
  message = _one_line(error)
  assert message.startswith(f'no checkpoint in {_ckpts(run)} verifies: step '
                            '4 (')
  assert '2 (state/_METADATA is missing)' in message, message
  assert sorted(os.listdir(run / 'pretrain' / 'checkpoints_damaged')) == [
      '2', '4']  # moved aside, never deleted


def test_overwrite_moves_the_old_stage_aside(tmp_path, data_dir, pretrained):
  run = _copy(pretrained, tmp_path)
  c = _pretrain_config(data_dir, **{'pretrain.mask_ratio': 0.5,
                                    'pretrain.steps': 2, 'stop_at_step': 0,
                                    'mode': 'pretrain', 'overwrite': True})
  pipeline.run(c, str(run))
  assert sorted(os.listdir(run / 'pretrain.old-1' / 'checkpoints')) == [
      '2', '4', 'fingerprint.json']
  assert checkpoint.latest_step(_ckpts(run)) == 2
  stored = json.loads((_ckpts(run) / 'fingerprint.json').read_text())
  assert stored['pretrain.mask_ratio'] == 0.5


def test_init_change_is_named(tmp_path, data_dir):
  """A fine-tune re-run from another init (or from a changed pre-training)
  is refused, naming the init; checked on the directories alone."""
  a = _fake_run(tmp_path / 'a', stages=('pretrain',))
  b = _fake_run(tmp_path / 'b', stages=('pretrain',))
  c = tiny_config(data_dir, mode='finetune')
  stage = tmp_path / 'run' / 'finetune'
  pipeline.guard_stage(c, str(stage), 'finetune', str(a / 'pretrain' /
                                                      'checkpoints'))
  os.makedirs(stage / 'checkpoints' / '20')  # it trained
  pipeline.guard_stage(c, str(stage), 'finetune', str(a / 'pretrain' /
                                                      'checkpoints'))
  with pytest.raises(ValueError, match=r"init_from '.*/a/pretrain/checkpoints'"
                     r" -> '.*/b/pretrain/checkpoints'"):
    pipeline.guard_stage(c, str(stage), 'finetune',
                         str(b / 'pretrain' / 'checkpoints'))
  os.makedirs(a / 'pretrain' / 'checkpoints' / '80')  # trained on
  with pytest.raises(ValueError, match=r'init_step 40 -> 80'):
    pipeline.guard_stage(c, str(stage), 'finetune',
                         str(a / 'pretrain' / 'checkpoints'))
  c.finetune.eval_every = 7  # allowed
  c.finetune.steps = 500
  pipeline.guard_stage(c, str(stage), 'finetune', str(a / 'pretrain' /
                                                      'checkpoints'),
                       partial=True)  # the init is made in this call


def test_nan_before_any_checkpoint_says_so(tmp_path, data_dir):
  from mimjax.training import loop  # pylint: disable=g-import-not-at-top
  c = tiny_config(data_dir, mode='pretrain')
  c.pretrain.update(dict(steps=6, warmup_steps=0, base_lr=1e30))
  c.update(dict(log_every=1, checkpoint_every=100))
  with pytest.raises(loop.NonFiniteError, match=r'last good checkpoint: no '
                     r'checkpoint yet in .*pretrain/checkpoints$'):
    pipeline.run(c, str(tmp_path))
