"""The click faces of signatures: the trust options every reading command takes, ``--sign-key``, ``keygen`` and
``sign``. Both command lines register them; the signing itself is ``mist.formats.signing``.

Like ``commands.py`` this module imports only click and the kit at load time, so ``--threads`` can still set the
BLAS thread count before NumPy loads; keys are read inside the commands and callbacks.

- ``--signatures require|when-present|off`` (default ``when-present``) and ``--trusted-key FILE|DIR``
  (repeatable) on ``verify``, ``pull``, ``train``, ``evaluate``, ``predict`` and ``report``: ``current_trust()``
  turns them into a ``Trust``. Each reads ``MIST_<COMMAND>_<OPTION>``, else ``$MIST_SIGNATURES`` and
  ``$MIST_TRUSTED_KEYS`` (paths separated by ``:``), which a whole device sets once;
- ``--sign-key FILE`` (``MIST_<COMMAND>_SIGN_KEY``, else ``$MIST_SIGN_KEY``) on ``extract``, ``convert`` and
  ``export``: sign what they write;
- ``keygen KEY``: a new key pair, ``KEY`` (secret, mode 0600) and ``KEY.pub``;
- ``sign TARGET --key KEY``: sign a complete feature set (every shard hashed first) or an adaptor file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mist.kit.flags import LazyChoice

if TYPE_CHECKING:
    from mist.formats.signing import SigningKey, Trust

POLICY_ENV, KEYS_ENV, SIGN_KEY_ENV = "MIST_SIGNATURES", "MIST_TRUSTED_KEYS", "MIST_SIGN_KEY"
_META = "mist.trust."


def _policies() -> tuple[str, ...]:
    from mist.formats.signing import POLICIES

    return POLICIES


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    ctx.meta[_META + param.name] = value


def trust_options(f):
    """``--signatures`` and ``--trusted-key`` for a command, read back with ``current_trust()`` inside it. Each
    reads ``MIST_<COMMAND>_<OPTION>`` like every option (kit.cli.teach names it), else the variable a whole
    device shares."""
    f = click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(exists=True),
                     envvar=[KEYS_ENV], callback=_remember, expose_value=False,
                     metavar="FILE|DIR",
                     help="A public key file (mist-ed25519 lines; `keygen` writes KEY.pub) or a folder of *.pub "
                          "files to trust; repeat it to trust several keys (rotation). The variables take paths "
                          f"separated by ':'; ${KEYS_ENV} serves every command.")(f)
    return click.option("--signatures", type=LazyChoice(_policies), default="when-present",
                        envvar=[POLICY_ENV], callback=_remember, expose_value=False,
                        help="require: refuse a feature set or adaptor without a valid signature by a trusted "
                             "key; when-present: check a signature when there is one (an unsigned file passes, "
                             f"with a warning once keys are trusted); off: do not look. ${POLICY_ENV} serves "
                             "every command.")(f)


def current_trust() -> Trust:
    """The running command's ``Trust``: its policy and the public keys it trusts, read once."""
    from mist.formats.signing import Trust, read_public_keys

    ctx = click.get_current_context()
    if _META + "trust" not in ctx.meta:
        keys = read_public_keys(ctx.meta.get(_META + "trusted_keys") or ())
        ctx.meta[_META + "trust"] = Trust(ctx.meta.get(_META + "signatures") or "when-present", keys,
                                          warn=lambda message: click.echo(message, err=True))
    return ctx.meta[_META + "trust"]


def _read_sign_key(ctx: click.Context, param: click.Parameter, value: str | None) -> SigningKey | None:
    if value is None:
        return None
    from mist.formats.signing import read_signing_key

    return read_signing_key(value)  # a bad key fails here, before any work


def sign_key_option(what: str):
    """``--sign-key FILE``: sign ``what`` with this secret key."""
    return click.option("--sign-key", type=click.Path(exists=True, dir_okay=False), default=None,
                        envvar=[SIGN_KEY_ENV], callback=_read_sign_key,
                        metavar="KEY",
                        help=f"Sign {what} with this secret key (`keygen` makes one; needs mist-tuning[sign]). "
                             "Devices that trust KEY.pub can then refuse anything else.")


@click.command(short_help="Make an Ed25519 key pair for signing sets and adaptors.", epilog="""\b
Examples:
  mist-cloud keygen ~/.config/mist/cloud-2025.key --comment cloud-2025
  scp ~/.config/mist/cloud-2025.key.pub pi:trusted/          # the device trusts the .pub, never the key
Keep KEY off the devices and out of any repository.""")
@click.argument("key", type=click.Path(dir_okay=False))
@click.option("--comment", default="", help="A word stored beside the key, e.g. who holds it.")
def keygen(key: str, comment: str) -> None:
    """Write a new secret key to KEY (mode 0600) and its public key to KEY.pub. Neither may exist."""
    from mist.formats.signing import generate_key, write_key_pair

    made = generate_key(comment)
    secret, public = write_key_pair(key, made)
    click.echo(f"key {made.public.key_id}: secret {secret} (keep it private), public {public} (give it to the "
               "devices: --trusted-key or $MIST_TRUSTED_KEYS)")


@click.command(short_help="Sign a feature set or an adaptor with a secret key.", epilog="""\b
Examples:
  mist-cloud sign feats/train --key cloud.key          # every shard is hashed first
  mist-cloud sign adaptor.safetensors --key owner.key""")
@click.argument("target", type=click.Path(exists=True))
@click.option("--key", type=click.Path(exists=True, dir_okay=False), envvar=SIGN_KEY_ENV, required=True,
              metavar="KEY", help=f"The secret key (`keygen` writes one); ${SIGN_KEY_ENV} also serves --sign-key.")
def sign(target: str, key: str) -> None:
    """Sign TARGET in place: a complete feature-set folder (its manifest, once every shard header and checksum
    is checked) or an adaptor checkpoint (once its digests are checked). A new signature replaces an old one."""
    from mist.formats.signing import read_signing_key

    key = read_signing_key(key)
    path = Path(target)
    if path.is_dir():
        from mist.formats.writer import sign_feature_set

        manifest = sign_feature_set(path, key)
        click.echo(f"signed {path} ({manifest.rows:,} rows, {len(manifest.shards)} shards) with key "
                   f"{key.public.key_id}")
        return
    from mist.formats import load_checkpoint, save_checkpoint

    save_checkpoint(path, load_checkpoint(path), signer=key)
    click.echo(f"signed {path} with key {key.public.key_id}")
