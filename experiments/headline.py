"""The headline metric of a results row, whatever the task.

Rotten Tomatoes and the decoder task report accuracy; the GLUE/SuperGLUE
tasks report their major metric as ``score`` (CoLA's Matthews correlation,
STS-B's mean of Pearson and Spearman, MRPC's and CB's accuracy/F1 means) and
STS-B has no accuracy at all. ``train.results_row`` records which one a run
has as ``row['metric']``; rows written before that field existed are
accuracy rows.
"""


def metric(row: dict) -> str:
  """``'score'`` or ``'accuracy'``: the key suffix of the row's headline metric."""
  return row.get('metric', 'accuracy')


def value(row: dict, split: str = 'test', when: str = 'after') -> float:
  """The headline metric of ``split`` (``test``/``validation``) ``when``
  (``before``/``after`` training), a fraction in [0, 1] (correlations in
  [-1, 1])."""
  return row[f'{when}_{split}_{metric(row)}']


def label(rows: list[dict]) -> str:
  """A short axis/column name for the rows' headline metric."""
  names = {metric(r) for r in rows}
  return 'acc' if names == {'accuracy'} else 'score'


def dates(rows: list[dict]) -> str:
  """When the rows were measured: one date, or the first to the last."""
  found = sorted({r['date'] for r in rows})
  return found[0] if len(found) == 1 else f'{found[0]} to {found[-1]}'


def selection_note(rows: list[dict]) -> str:
  """``''``, or for rows tabled ``--at best`` (``compare.at_best``) a
  sentence saying that their "after" values are each run's best-validation
  evaluation and at which steps."""
  chosen = sorted({r['evaluated_at'] for r in rows if 'evaluated_at' in r})
  if not chosen:
    return ''
  return (
    f'"After" is each run\'s evaluation with the best validation {label(rows)} '
    f'(at steps {", ".join(map(str, chosen))}), not its final adapter.'
  )
