//! Envelopes, model payloads, framing and the libp2p codec.

use cohort_protocol::codec::{CodecConfig, Rounding, TopK};
use cohort_protocol::framing::{frame, unframe};
use cohort_protocol::messages::*;
use cohort_protocol::{
    Fingerprint, GroupLayout, Layout, ParamGroups, ProtocolError, TensorSpec, PROTOCOL_VERSION,
};

fn plan() -> RoundPlan {
    RoundPlan {
        federation: "fed".into(),
        round: 7,
        base_version: 6,
        upload: vec!["backbone".into(), "head/digits".into()],
        train: TrainConfig {
            optimizer: Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            frozen: vec!["head/x".into()],
            max_steps: Some(12),
            ..TrainConfig::default()
        },
        codec: CodecConfig {
            bits: 4,
            rounding: Rounding::Nearest,
            chunk: 64,
            top_k: Some(TopK::Fraction(0.1)),
        },
        deadline_ms: 30_000,
        privacy: None,
    }
}

fn requests() -> Vec<Request> {
    vec![
        Request::Hello(Hello {
            node: "n1".into(),
            tasks: vec![TaskSamples {
                task: "digits".into(),
                samples: 500,
            }],
            layout: Fingerprint([3; 32]),
            version: PROTOCOL_VERSION,
        }),
        Request::GetPlan,
        Request::GetModel {
            groups: vec!["backbone".into()],
            have_version: Some(3),
        },
        Request::Submit(Update {
            header: UpdateHeader {
                federation: "fed".into(),
                round: 7,
                base_version: 6,
                node: "n1".into(),
                groups: vec!["backbone".into()],
                metrics: vec![TaskMetrics {
                    task: "digits".into(),
                    loss: 0.5,
                    samples: 500,
                    steps: 16,
                }],
                num_examples: 500,
            },
            sealed: vec![9; 1000],
        }),
        Request::Report(EvalReport {
            node: "n1".into(),
            round: 7,
            version: 7,
            metrics: vec![EvalMetrics {
                task: "digits".into(),
                accuracy: 0.9,
                loss: 0.3,
                samples: 100,
            }],
        }),
    ]
}

fn responses() -> Vec<Response> {
    let mut p = ParamGroups::new();
    p.insert("backbone", vec![1.0, -2.5, 3.25]);
    vec![
        Response::Welcome {
            node: "n1".into(),
            model_version: 4,
        },
        Response::Plan(plan()),
        Response::Wait { retry_ms: 250 },
        Response::Evaluate {
            round: 3,
            version: 3,
        },
        Response::Model(ModelPayload::from_groups(5, Some(4), &p)),
        Response::Ack,
        Response::Refused(Refusal {
            code: RefusalCode::Replay,
            message: "again".into(),
        }),
    ]
}

#[test]
fn every_message_round_trips() {
    let limits = Limits::default();
    for r in requests() {
        let env = Envelope::new("fed", r);
        let bytes = encode_envelope(&env).expect("encode");
        assert_eq!(
            decode_request(&bytes, &limits, Some("fed")).expect("decode"),
            env
        );
    }
    for r in responses() {
        let env = Envelope::new("fed", r);
        let bytes = encode_envelope(&env).expect("encode");
        assert_eq!(
            decode_response(&bytes, &limits, Some("fed")).expect("decode"),
            env
        );
    }
}

/// The encoding before `encode_envelope` wrote straight into its output:
/// the version, then a second buffer of bincode appended.
fn old_encoding<B: serde::Serialize>(env: &Envelope<B>) -> Vec<u8> {
    let mut out = env.version.to_le_bytes().to_vec();
    let rest =
        bincode::serde::encode_to_vec((&env.federation, &env.body), bincode::config::standard())
            .expect("encode");
    out.extend_from_slice(&rest);
    out
}

#[test]
fn the_encoding_is_byte_for_byte_the_old_one_in_a_buffer_of_its_size() {
    let check = |bytes: Vec<u8>, old: Vec<u8>| {
        assert_eq!(bytes, old);
        // Reserved once, at the exact size: no growth, no spare copy.
        assert_eq!(bytes.capacity(), bytes.len());
    };
    for r in requests() {
        let env = Envelope::new("a federation", r);
        check(encode_envelope(&env).expect("encode"), old_encoding(&env));
    }
    for r in responses() {
        let env = Envelope::new("fed", r);
        check(encode_envelope(&env).expect("encode"), old_encoding(&env));
    }
}

#[test]
fn optimizer_is_tagged_in_json_and_plain_on_the_wire() {
    let o = Optimizer::Momentum {
        momentum: 0.9,
        nesterov: true,
    };
    let json = serde_json::to_string(&o).expect("json");
    assert_eq!(
        json,
        r#"{"kind":"momentum","momentum":0.9,"nesterov":true}"#
    );
    assert_eq!(serde_json::from_str::<Optimizer>(&json).expect("back"), o);
}

#[test]
fn version_is_checked_before_the_body() {
    let env = Envelope::new("fed", Request::GetPlan);
    let mut bytes = encode_envelope(&env).expect("encode");
    let other = PROTOCOL_VERSION + 1;
    bytes[..2].copy_from_slice(&other.to_le_bytes());
    // Even a garbled body is reported as a version mismatch.
    bytes.truncate(3);
    assert_eq!(
        decode_request(&bytes, &Limits::default(), None),
        Err(ProtocolError::VersionMismatch {
            expected: PROTOCOL_VERSION,
            got: other
        })
    );
}

#[test]
fn wrong_federation_is_a_typed_error() {
    let bytes = encode_envelope(&Envelope::new("other", Request::GetPlan)).expect("encode");
    assert_eq!(
        decode_request(&bytes, &Limits::default(), Some("fed")),
        Err(ProtocolError::WrongFederation {
            expected: "fed".into(),
            got: "other".into()
        })
    );
    assert!(decode_request(&bytes, &Limits::default(), None).is_ok());
}

#[test]
fn size_limit_and_trailing_bytes() {
    let bytes = encode_envelope(&Envelope::new("fed", requests().remove(3))).expect("encode");
    let small = Limits {
        max_request: 100,
        max_response: 100,
        ..Limits::default()
    };
    assert!(matches!(
        decode_request(&bytes, &small, None),
        Err(ProtocolError::TooLarge { .. })
    ));
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        decode_request(&longer, &Limits::default(), None),
        Err(ProtocolError::Malformed(_))
    ));
}

#[test]
fn tiny_input_claiming_a_huge_vec_fails_fast() {
    // version, federation "f", variant 3 (Submit), then a header whose
    // federation string claims 2^60 bytes (varint tag 253 = u64 follows).
    let mut bytes = PROTOCOL_VERSION.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[1, b'f', 3, 253]);
    bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
    bytes.extend_from_slice(&[0; 6]);
    assert_eq!(bytes.len(), 20);
    let r = decode_request(&bytes, &Limits::default(), None);
    assert!(
        matches!(
            r,
            Err(ProtocolError::TooLarge { .. } | ProtocolError::Malformed(_))
        ),
        "{r:?}"
    );
    // The same claim on the bulk field (the sealed bytes) of a valid header.
    let env = Envelope::new("f", requests().remove(3));
    let good = encode_envelope(&env).expect("encode");
    let cut = good.len() - 1000 - 3; // the sealed length varint (251 + u16) precedes the bytes
    let mut evil = good[..cut].to_vec();
    evil.push(253);
    evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(decode_request(&evil, &Limits::default(), None).is_err());
}

fn layout() -> Layout {
    Layout {
        groups: vec![GroupLayout {
            name: "backbone".into(),
            tensors: vec![TensorSpec {
                name: "w".into(),
                shape: vec![3],
                offset: 0,
            }],
        }],
    }
}

#[test]
fn model_payload_is_checked_against_the_layout() {
    let mut p = ParamGroups::new();
    p.insert("backbone", vec![1.0, -2.5, 3.25]);
    let m = ModelPayload::from_groups(1, None, &p);
    assert_eq!(m.groups[0].data.len(), 12);
    assert_eq!(&m.groups[0].data[..4], &1.0f32.to_le_bytes());
    assert_eq!(m.to_groups(&layout()).expect("fits"), p);

    let mut short = m.clone();
    short.groups[0].data.pop();
    assert!(matches!(
        short.to_groups(&layout()),
        Err(ProtocolError::GroupLength { .. })
    ));
    let mut unknown = m.clone();
    unknown.groups[0].name = "head/x".into();
    assert!(matches!(
        unknown.to_groups(&layout()),
        Err(ProtocolError::UnknownGroup(_))
    ));
    let mut twice = m.clone();
    twice.groups.push(m.groups[0].clone());
    assert!(matches!(
        twice.to_groups(&layout()),
        Err(ProtocolError::Malformed(_))
    ));
    let mut nan = m.clone();
    nan.groups[0].data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(matches!(
        nan.to_groups(&layout()),
        Err(ProtocolError::NonFinite(_))
    ));
}

#[test]
fn frames_bound_their_length() {
    let f = frame(b"hello");
    assert_eq!(unframe(&f, 5), Ok(&b"hello"[..]));
    assert!(matches!(
        unframe(&f, 4),
        Err(ProtocolError::TooLarge {
            got: 5,
            limit: 4,
            ..
        })
    ));
    assert!(matches!(
        unframe(&f[..10], 5),
        Err(ProtocolError::Malformed(_))
    ));
    assert!(matches!(
        unframe(&f[..3], 5),
        Err(ProtocolError::Malformed(_))
    ));
}

#[cfg(feature = "libp2p")]
mod p2p {
    use super::*;
    use cohort_protocol::framing::{read_frame, write_frame};
    use cohort_protocol::p2p::{protocol_error, CohortCodec, PROTOCOL_NAME};
    use futures::executor::block_on;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;
    use libp2p::StreamProtocol;

    #[test]
    fn codec_round_trips_over_a_cursor() {
        let mut codec = CohortCodec::default();
        let proto = StreamProtocol::new(PROTOCOL_NAME);
        block_on(async {
            for r in requests() {
                let env = Envelope::new("fed", r);
                let mut buf = Cursor::new(Vec::new());
                codec
                    .write_request(&proto, &mut buf, env.clone())
                    .await
                    .expect("write");
                buf.set_position(0);
                assert_eq!(
                    codec.read_request(&proto, &mut buf).await.expect("read"),
                    env
                );
            }
            for r in responses() {
                let env = Envelope::new("fed", r);
                let mut buf = Cursor::new(Vec::new());
                codec
                    .write_response(&proto, &mut buf, env.clone())
                    .await
                    .expect("write");
                buf.set_position(0);
                assert_eq!(
                    codec.read_response(&proto, &mut buf).await.expect("read"),
                    env
                );
            }
        });
    }

    #[test]
    fn codec_refuses_oversized_frames_before_reading_them() {
        let proto = StreamProtocol::new(PROTOCOL_NAME);
        let mut codec = CohortCodec::new(Limits {
            max_request: 64,
            max_response: 64,
            ..Limits::default()
        });
        block_on(async {
            // A prefix announcing 2^40 bytes, and nothing behind it.
            let mut buf = Cursor::new((1u64 << 40).to_le_bytes().to_vec());
            let e = codec
                .read_request(&proto, &mut buf)
                .await
                .expect_err("refused");
            assert!(
                matches!(protocol_error(&e), Some(ProtocolError::TooLarge { .. })),
                "{e}"
            );
            let env = Envelope::new("fed", requests().remove(3));
            let mut out = Cursor::new(Vec::new());
            let e = codec
                .write_request(&proto, &mut out, env)
                .await
                .expect_err("too big to send");
            assert!(matches!(
                protocol_error(&e),
                Some(ProtocolError::TooLarge { .. })
            ));
            // A frame cut short is an I/O error, not a hang or a panic.
            let mut cut = Cursor::new(Vec::new());
            write_frame(&mut cut, &[1, 2, 3, 4], 64)
                .await
                .expect("write");
            let mut v = cut.into_inner();
            v.truncate(10);
            assert!(read_frame(&mut Cursor::new(v), 64).await.is_err());
        });
    }
}
