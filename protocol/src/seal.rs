//! Sealing of encoded updates to the aggregator's key.
//!
//! A node seals with an ephemeral X25519 key agreed with the aggregator's
//! long-term X25519 public key (ring's `agreement`), derives an AES-256-GCM
//! key with HKDF-SHA256 (ring), and encrypts with associated data that binds
//! the protocol version, federation, round, sender and groups
//! ([`SealContext`]). Each sealed update uses a fresh key, so the all-zero
//! nonce is safe.
//!
//! The aggregator's side needs the *static* X25519 scalar multiplication,
//! which ring does not offer (its X25519 private keys are ephemeral only and
//! cannot be loaded from bytes): it uses `x25519_dalek::x25519`, the plain
//! RFC 7748 function, on the 32-byte secret kept in the key file.
//!
//! Layout of a sealed update:
//! `"CSL1" | key id (8) | round (u64 LE) | sender length (u16 LE) | sender |
//! ephemeral public key (32) | ciphertext | tag (16)`.
//! The key id and the clear copies of round and sender are there so that
//! [`SealKeyPair::open`] can say *why* it refuses (another key, another round
//! or sender, tampering); they are authenticated too, through the context in
//! the associated data.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::ProtocolError;

const MAGIC: &[u8; 4] = b"CSL1";
const KEY_FILE_MAGIC: &[u8; 8] = b"COHORTSK";
const PUBLIC_PREFIX: &str = "cohort-pk1:";
const HKDF_INFO: &[u8] = b"cohort-seal-v1 aes-256-gcm";
/// Bytes of the authentication tag a sealed update ends with.
pub const TAG_LEN: usize = 16;
/// Longest sender id a sealed update may name.
pub const MAX_SENDER_LEN: usize = 1024;

/// What a sealed update is bound to. Opening with any other context fails.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SealContext {
    pub version: u16,
    pub federation: String,
    pub round: u64,
    pub sender: String,
    pub groups: Vec<String>,
}

impl SealContext {
    /// The context an update's header claims: what its seal must be bound to.
    pub fn of_update(h: &crate::messages::UpdateHeader) -> Self {
        SealContext {
            version: crate::PROTOCOL_VERSION,
            federation: h.federation.clone(),
            round: h.round,
            sender: h.node.clone(),
            groups: h.groups.clone(),
        }
    }

    /// Canonical bytes of the context: the AEAD's associated data.
    fn aad(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.federation.len() + self.sender.len());
        out.extend_from_slice(b"cohort-seal-ad-v1");
        out.extend_from_slice(&self.version.to_le_bytes());
        let mut put = |s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        put(&self.federation);
        put(&self.sender);
        for g in &self.groups {
            put(g);
        }
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&(self.groups.len() as u64).to_le_bytes());
        out
    }
}

/// The aggregator's public sealing key. Displays as `cohort-pk1:<64 hex>`,
/// the string node operators put in their configs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SealPublicKey(pub [u8; 32]);

impl SealPublicKey {
    /// First 8 bytes of SHA-256 of the key: names the key in sealed updates.
    pub fn key_id(&self) -> [u8; 8] {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(&d.as_ref()[..8]);
        id
    }
}

impl fmt::Display for SealPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PUBLIC_PREFIX)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SealPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealPublicKey({self})")
    }
}

impl FromStr for SealPublicKey {
    type Err = ProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |m: &str| ProtocolError::BadKey(format!("sealing public key `{s}`: {m}"));
        let hex = s
            .trim()
            .strip_prefix(PUBLIC_PREFIX)
            .ok_or_else(|| bad("must start with `cohort-pk1:`"))?;
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad("needs 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| bad("not hexadecimal"))?;
        }
        Ok(SealPublicKey(out))
    }
}

/// The aggregator's long-term sealing key pair.
pub struct SealKeyPair {
    secret: [u8; 32],
    public: SealPublicKey,
}

impl fmt::Debug for SealKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

fn crypto(what: &str) -> ProtocolError {
    ProtocolError::Crypto(what.to_string())
}

impl SealKeyPair {
    /// A new key pair from the system's secure random generator.
    pub fn generate() -> Result<Self, ProtocolError> {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| crypto("system random generator failed"))?;
        Ok(Self::from_secret(secret))
    }

    fn from_secret(secret: [u8; 32]) -> Self {
        let public = SealPublicKey(x25519_dalek::x25519(
            secret,
            x25519_dalek::X25519_BASEPOINT_BYTES,
        ));
        SealKeyPair { secret, public }
    }

    pub fn public(&self) -> SealPublicKey {
        self.public
    }

    /// Loads the key pair from `path`, or creates it there on first start:
    /// written to a temporary file readable by its owner only (mode 0600),
    /// then renamed, so a crash never leaves half a key.
    pub fn load_or_create(path: &Path) -> Result<Self, ProtocolError> {
        let key_err = |m: String| ProtocolError::KeyFile {
            path: path.display().to_string(),
            reason: m,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                if bytes.len() != KEY_FILE_MAGIC.len() + 32 || !bytes.starts_with(KEY_FILE_MAGIC) {
                    return Err(key_err(
                        "not a Cohort sealing key file (wrong size or magic)".into(),
                    ));
                }
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(path)
                        .map_err(|e| key_err(e.to_string()))?
                        .permissions()
                        .mode();
                    if mode & 0o077 != 0 {
                        return Err(key_err(format!(
                            "readable by others (mode {:o}); chmod 600 it",
                            mode & 0o777
                        )));
                    }
                }
                let mut secret = [0u8; 32];
                secret.copy_from_slice(&bytes[KEY_FILE_MAGIC.len()..]);
                Ok(Self::from_secret(secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pair = Self::generate()?;
                let mut bytes = KEY_FILE_MAGIC.to_vec();
                bytes.extend_from_slice(&pair.secret);
                if create_private_file(path, &bytes).map_err(|e| key_err(e.to_string()))? {
                    Ok(pair)
                } else {
                    // Another process created it first: use theirs.
                    Self::load_or_create(path)
                }
            }
            Err(e) => Err(key_err(e.to_string())),
        }
    }

    /// Opens an update sealed to this key under `ctx`. Refuses, each with
    /// its own error: another key ([`ProtocolError::WrongKey`]), another
    /// round or sender ([`ProtocolError::ContextMismatch`]), and any other
    /// change of a bit ([`ProtocolError::Tampered`]).
    pub fn open(&self, ctx: &SealContext, sealed: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        let (key, body_start) = self.body_key(ctx, sealed)?;
        let mut buf = sealed[body_start..].to_vec();
        let n = key
            .open_in_place(
                Nonce::assume_unique_for_key([0u8; 12]),
                Aad::from(ctx.aad()),
                &mut buf,
            )
            .map_err(|_| ProtocolError::Tampered)?
            .len();
        buf.truncate(n);
        Ok(buf)
    }

    /// [`open`](Self::open) without a copy: decrypts inside `sealed` and
    /// returns the plaintext, a slice of it. Refuses as `open` does; after a
    /// refusal the contents of `sealed` are unspecified (ring may have
    /// decrypted or cleared the body), so drop it.
    pub fn open_in_place<'a>(
        &self,
        ctx: &SealContext,
        sealed: &'a mut [u8],
    ) -> Result<&'a mut [u8], ProtocolError> {
        let (key, body_start) = self.body_key(ctx, sealed)?;
        key.open_in_place(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(ctx.aad()),
            &mut sealed[body_start..],
        )
        .map_err(|_| ProtocolError::Tampered)
    }

    /// Checks the clear header against this key and `ctx`, and derives the
    /// update's AES key; returns it with the offset of the ciphertext.
    fn body_key(
        &self,
        ctx: &SealContext,
        sealed: &[u8],
    ) -> Result<(LessSafeKey, usize), ProtocolError> {
        let h = parse_header(sealed)?;
        if h.key_id != self.public.key_id() {
            return Err(ProtocolError::WrongKey);
        }
        if h.round != ctx.round {
            return Err(ProtocolError::ContextMismatch(format!(
                "sealed for round {}, presented as round {}",
                h.round, ctx.round
            )));
        }
        if h.sender != ctx.sender.as_bytes() {
            return Err(ProtocolError::ContextMismatch(format!(
                "sealed by `{}`, presented as `{}`",
                String::from_utf8_lossy(h.sender),
                ctx.sender
            )));
        }
        let shared = x25519_dalek::x25519(self.secret, h.ephemeral);
        if shared.iter().all(|&b| b == 0) {
            return Err(ProtocolError::Tampered);
        }
        let key = derive_key(&shared, &h.ephemeral, &self.public.0)?;
        Ok((key, h.body_start))
    }
}

struct Header<'a> {
    key_id: [u8; 8],
    round: u64,
    sender: &'a [u8],
    ephemeral: [u8; 32],
    body_start: usize,
}

fn parse_header(sealed: &[u8]) -> Result<Header<'_>, ProtocolError> {
    let short = || ProtocolError::Malformed("sealed update too short".into());
    let rest = sealed
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| ProtocolError::Malformed("not a sealed update (magic)".into()))?;
    let (key_id, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    let (round, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    let (slen, rest) = rest.split_first_chunk::<2>().ok_or_else(short)?;
    let slen = usize::from(u16::from_le_bytes(*slen));
    if slen > MAX_SENDER_LEN || rest.len() < slen + 32 + TAG_LEN {
        return Err(short());
    }
    let (sender, rest) = rest.split_at(slen);
    let (eph, rest) = rest.split_first_chunk::<32>().ok_or_else(short)?;
    Ok(Header {
        key_id: *key_id,
        round: u64::from_le_bytes(*round),
        sender,
        ephemeral: *eph,
        body_start: sealed.len() - rest.len(),
    })
}

fn derive_key(
    shared: &[u8],
    ephemeral: &[u8; 32],
    recipient: &[u8; 32],
) -> Result<LessSafeKey, ProtocolError> {
    let mut salt_bytes = [0u8; 64];
    salt_bytes[..32].copy_from_slice(ephemeral);
    salt_bytes[32..].copy_from_slice(recipient);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt_bytes).extract(shared);
    let okm = prk
        .expand(&[HKDF_INFO], &AES_256_GCM)
        .map_err(|_| crypto("hkdf expand"))?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

/// Bytes a sealed update under `ctx` carries before its ciphertext: the
/// room [`seal_in_place`] expects at the start of its buffer.
pub fn sealed_header_len(ctx: &SealContext) -> usize {
    MAGIC.len() + 8 + 8 + 2 + ctx.sender.len() + 32
}

fn check_sender(ctx: &SealContext) -> Result<(), ProtocolError> {
    if ctx.sender.len() > MAX_SENDER_LEN {
        return Err(ProtocolError::Malformed(format!(
            "sender id longer than {MAX_SENDER_LEN} bytes"
        )));
    }
    Ok(())
}

/// Seals `plaintext` to `recipient` under `ctx`.
pub fn seal(
    recipient: &SealPublicKey,
    ctx: &SealContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, ProtocolError> {
    check_sender(ctx)?;
    let header_len = sealed_header_len(ctx);
    let mut out = Vec::with_capacity(header_len + plaintext.len() + TAG_LEN);
    out.resize(header_len, 0);
    out.extend_from_slice(plaintext);
    seal_in_place(recipient, ctx, &mut out)?;
    Ok(out)
}

/// Seals without a copy: `buf` holds [`sealed_header_len`]`(ctx)` bytes of
/// room (any contents) followed by the plaintext, e.g. from
/// [`crate::codec::encode_into`]. Writes the header into the room, encrypts
/// the rest in place and appends the tag: `buf` becomes what [`seal`] returns.
/// On error `buf` is left as it was.
pub fn seal_in_place(
    recipient: &SealPublicKey,
    ctx: &SealContext,
    buf: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    check_sender(ctx)?;
    let header_len = sealed_header_len(ctx);
    if buf.len() < header_len {
        return Err(ProtocolError::Malformed(format!(
            "seal buffer of {} bytes has no room for a {header_len}-byte header",
            buf.len()
        )));
    }
    let rng = SystemRandom::new();
    let eph = EphemeralPrivateKey::generate(&X25519, &rng)
        .map_err(|_| crypto("ephemeral key generation"))?;
    let eph_pub = eph
        .compute_public_key()
        .map_err(|_| crypto("ephemeral public key"))?;
    let mut eph_bytes = [0u8; 32];
    eph_bytes.copy_from_slice(eph_pub.as_ref());
    let peer = UnparsedPublicKey::new(&X25519, recipient.0);
    let key = agreement::agree_ephemeral(eph, &peer, |shared| {
        derive_key(shared, &eph_bytes, &recipient.0)
    })
    .map_err(|_| crypto("key agreement (invalid public key?)"))??;
    // The header is not the associated data (the context is), so it can be
    // written after the body is encrypted; a failed seal leaves `buf` as it was.
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(ctx.aad()),
            &mut buf[header_len..],
        )
        .map_err(|_| crypto("seal"))?;
    let mut header = Vec::with_capacity(header_len);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&recipient.key_id());
    header.extend_from_slice(&ctx.round.to_le_bytes());
    header.extend_from_slice(&(ctx.sender.len() as u16).to_le_bytes());
    header.extend_from_slice(ctx.sender.as_bytes());
    header.extend_from_slice(&eph_bytes);
    buf[..header_len].copy_from_slice(&header);
    buf.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Remembers which (round, sender) pairs were opened, to refuse replays.
#[derive(Debug, Default, Clone)]
pub struct ReplayGuard {
    seen: BTreeSet<(u64, String)>,
}

impl ReplayGuard {
    /// Refuses a second update for the same round and sender; records the
    /// first.
    pub fn check_and_record(&mut self, ctx: &SealContext) -> Result<(), ProtocolError> {
        if self.seen.insert((ctx.round, ctx.sender.clone())) {
            Ok(())
        } else {
            Err(ProtocolError::Replay {
                round: ctx.round,
                sender: ctx.sender.clone(),
            })
        }
    }

    /// Forgets rounds below `round` (they can no longer be accepted anyway).
    pub fn prune_below(&mut self, round: u64) {
        self.seen = self.seen.split_off(&(round, String::new()));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Creates a secret file readable by its owner only (mode 0600), unless it
/// exists: written to a temporary file of this process first, synced, then
/// linked into place, so a crash never leaves half a key and two processes
/// starting at once end up with the same key. Returns false (and writes
/// nothing) when the file was already there.
pub fn create_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    let linked = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> SealContext {
        SealContext {
            version: crate::PROTOCOL_VERSION,
            federation: "fed".into(),
            round: 7,
            sender: "node-a".into(),
            groups: vec!["backbone".into(), "head/digits".into()],
        }
    }

    #[test]
    fn round_trip() {
        let k = SealKeyPair::generate().expect("key");
        let msg = b"encoded groups".repeat(100);
        let sealed = seal(&k.public(), &ctx(), &msg).expect("seal");
        assert_eq!(k.open(&ctx(), &sealed).expect("open"), msg);
    }

    #[test]
    fn in_place_seal_and_open_match_the_copying_ones() {
        let keys = SealKeyPair::generate().expect("keys");
        let c = ctx();
        let plain: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut buf = vec![0xee; sealed_header_len(&c)];
        buf.extend_from_slice(&plain);
        seal_in_place(&keys.public(), &c, &mut buf).expect("seal");
        assert_eq!(buf.len(), sealed_header_len(&c) + plain.len() + TAG_LEN);
        // What the copying open reads, and what seal would make.
        assert_eq!(keys.open(&c, &buf).expect("open"), plain);
        let sealed = seal(&keys.public(), &c, &plain).expect("seal");
        let mut copy = sealed.clone();
        assert_eq!(keys.open_in_place(&c, &mut copy).expect("open"), &plain[..]);
        // Tampering and another context are refused in place too.
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            keys.open_in_place(&c, &mut bad),
            Err(ProtocolError::Tampered)
        ));
        let other = SealContext {
            round: 8,
            ..c.clone()
        };
        let mut copy = sealed.clone();
        assert!(matches!(
            keys.open_in_place(&other, &mut copy),
            Err(ProtocolError::ContextMismatch(_))
        ));
        // No room for the header: refused, buffer as it was.
        let mut short = vec![1u8; 3];
        assert!(seal_in_place(&keys.public(), &c, &mut short).is_err());
        assert_eq!(short, vec![1u8; 3]);
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let k = SealKeyPair::generate().expect("key");
        let sealed = seal(&k.public(), &ctx(), b"0123456789abcdef").expect("seal");
        for i in 0..sealed.len() * 8 {
            let mut s = sealed.clone();
            s[i / 8] ^= 1 << (i % 8);
            assert!(
                k.open(&ctx(), &s).is_err(),
                "bit {i} flipped and still opened"
            );
        }
        let mut s = sealed.clone();
        let last = s.len() - 1;
        s[last] ^= 1;
        assert_eq!(k.open(&ctx(), &s), Err(ProtocolError::Tampered));
    }

    #[test]
    fn each_refusal_has_its_error() {
        let k = SealKeyPair::generate().expect("key");
        let other = SealKeyPair::generate().expect("key");
        let sealed = seal(&k.public(), &ctx(), b"payload").expect("seal");
        assert_eq!(other.open(&ctx(), &sealed), Err(ProtocolError::WrongKey));
        let mut c = ctx();
        c.round = 8;
        assert!(matches!(
            k.open(&c, &sealed),
            Err(ProtocolError::ContextMismatch(_))
        ));
        let mut c = ctx();
        c.sender = "node-b".into();
        assert!(matches!(
            k.open(&c, &sealed),
            Err(ProtocolError::ContextMismatch(_))
        ));
        let mut c = ctx();
        c.federation = "other".into();
        assert_eq!(k.open(&c, &sealed), Err(ProtocolError::Tampered));
        let mut c = ctx();
        c.groups.pop();
        assert_eq!(k.open(&c, &sealed), Err(ProtocolError::Tampered));
        let mut guard = ReplayGuard::default();
        guard.check_and_record(&ctx()).expect("first");
        assert!(matches!(
            guard.check_and_record(&ctx()),
            Err(ProtocolError::Replay { round: 7, .. })
        ));
        guard.prune_below(8);
        assert!(guard.is_empty());
        assert!(matches!(
            k.open(&ctx(), &sealed[..10]),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn key_file_survives_restart_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seal.key");
        let a = SealKeyPair::load_or_create(&path).expect("create");
        let b = SealKeyPair::load_or_create(&path).expect("load");
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let text = a.public().to_string();
        assert_eq!(text.parse::<SealPublicKey>().expect("parse"), a.public());
        assert!("cohort-pk1:zz".parse::<SealPublicKey>().is_err());
        std::fs::write(&path, b"garbage").expect("write");
        assert!(matches!(
            SealKeyPair::load_or_create(&path),
            Err(ProtocolError::KeyFile { .. })
        ));
    }
}
