//! One message = one datagram = one bare protobuf encoding, under 1 KiB (zds.md).
//! Decoding turns the wire messages into [`Request`] / [`Response`] values and rejects
//! what the protocol does not allow, with a reason fit for a negative Ack.

use prost::Message;

use super::proto::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request::Payload as Req,
    workload_response::Payload as Resp,
};

/// Both sides read into a buffer of this size: every message must be smaller.
pub const MAX_MESSAGE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("message of {0} bytes, the limit is {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("empty message (no payload)")]
    Empty,
    #[error("add of {uid:?} without workload info")]
    AddWithoutInfo { uid: String },
    #[error("add of {uid:?} carries {fds} file descriptors, expected exactly one")]
    AddFds { uid: String, fds: usize },
    #[error("{what} carries {fds} file descriptors, expected none")]
    UnexpectedFds { what: &'static str, fds: usize },
    #[error("empty workload uid")]
    EmptyUid,
    #[error("unsupported protocol version {0}")]
    Version(i32),
}

/// An agent-to-proxy message, checked. `Add` is paired with the fd by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Add { uid: String, info: WorkloadInfo },
    Keep { uid: String },
    Del { uid: String },
    SnapshotSent,
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Keep { .. } => "keep",
            Request::Del { .. } => "del",
            Request::SnapshotSent => "snapshot sent",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let payload = match self.clone() {
            Request::Add { uid, info } => Req::Add(AddWorkload {
                uid,
                workload_info: Some(info),
            }),
            Request::Keep { uid } => Req::Keep(KeepWorkload { uid }),
            Request::Del { uid } => Req::Del(DelWorkload { uid }),
            Request::SnapshotSent => Req::SnapshotSent(SnapshotSent {}),
        };
        WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    }

    /// Decodes a datagram that came with `fds` file descriptors.
    pub fn decode(buf: &[u8], fds: usize) -> Result<Self, CodecError> {
        check_size(buf)?;
        let msg = WorkloadRequest::decode(buf).map_err(|e| CodecError::Malformed(e.to_string()))?;
        let req = match msg.payload.ok_or(CodecError::Empty)? {
            Req::Add(a) => {
                let info = a
                    .workload_info
                    .ok_or_else(|| CodecError::AddWithoutInfo { uid: a.uid.clone() })?;
                if fds != 1 {
                    return Err(CodecError::AddFds { uid: a.uid, fds });
                }
                Request::Add { uid: a.uid, info }
            }
            Req::Keep(k) => Request::Keep { uid: k.uid },
            Req::Del(d) => Request::Del { uid: d.uid },
            Req::SnapshotSent(_) => Request::SnapshotSent,
        };
        if !matches!(req, Request::Add { .. }) && fds != 0 {
            return Err(CodecError::UnexpectedFds {
                what: req.name(),
                fds,
            });
        }
        match &req {
            Request::Add { uid, .. } | Request::Keep { uid } | Request::Del { uid }
                if uid.is_empty() =>
            {
                Err(CodecError::EmptyUid)
            }
            _ => Ok(req),
        }
    }
}

/// A proxy-to-agent answer: `Ok(())` for an Ack, `Err(reason)` for a negative one.
pub type Response = Result<(), String>;

pub fn encode_response(r: &Response) -> Vec<u8> {
    let encode = |error: &str| {
        WorkloadResponse {
            payload: Some(Resp::Ack(super::proto::Ack {
                error: error.to_string(),
            })),
        }
        .encode_to_vec()
    };
    let error = match r {
        Ok(()) => "",
        // An empty reason is a positive ack on the wire.
        Err(e) if e.is_empty() => "refused",
        Err(e) => e.as_str(),
    };
    let out = encode(error);
    if out.len() < MAX_MESSAGE {
        return out;
    }
    // A reason that long would not fit the peer's buffer: cut it (in bytes, at a
    // character boundary).
    let mut cut = MAX_MESSAGE / 2;
    while !error.is_char_boundary(cut) {
        cut -= 1;
    }
    encode(&error[..cut])
}

pub fn decode_response(buf: &[u8]) -> Result<Response, CodecError> {
    check_size(buf)?;
    let msg = WorkloadResponse::decode(buf).map_err(|e| CodecError::Malformed(e.to_string()))?;
    match msg.payload.ok_or(CodecError::Empty)? {
        Resp::Ack(a) if a.error.is_empty() => Ok(Ok(())),
        Resp::Ack(a) => Ok(Err(a.error)),
    }
}

pub fn encode_hello() -> Vec<u8> {
    ZdsHello {
        version: super::proto::Version::V1 as i32,
    }
    .encode_to_vec()
}

pub fn decode_hello(buf: &[u8]) -> Result<(), CodecError> {
    check_size(buf)?;
    let h = ZdsHello::decode(buf).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if h.version != super::proto::Version::V1 as i32 {
        return Err(CodecError::Version(h.version));
    }
    Ok(())
}

fn check_size(buf: &[u8]) -> Result<(), CodecError> {
    if buf.len() >= MAX_MESSAGE {
        Err(CodecError::TooLarge(buf.len()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> WorkloadInfo {
        WorkloadInfo {
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        }
    }

    #[test]
    fn requests_round_trip() {
        for (req, fds) in [
            (
                Request::Add {
                    uid: "u1".into(),
                    info: info(),
                },
                1,
            ),
            (Request::Keep { uid: "u1".into() }, 0),
            (Request::Del { uid: "u1".into() }, 0),
            (Request::SnapshotSent, 0),
        ] {
            assert_eq!(Request::decode(&req.encode(), fds).unwrap(), req);
        }
    }

    #[test]
    fn field_numbers_match_the_wire_contract() {
        // WorkloadRequest{del: DelWorkload{uid: "x"}}: field 2 (len) holding field 2 (len) "x".
        assert_eq!(
            Request::Del { uid: "x".into() }.encode(),
            vec![0x12, 0x03, 0x12, 0x01, b'x']
        );
        // keep is field 5, its uid field 1.
        assert_eq!(
            Request::Keep { uid: "x".into() }.encode(),
            vec![0x2a, 0x03, 0x0a, 0x01, b'x']
        );
        // snapshot_sent is field 3, empty.
        assert_eq!(Request::SnapshotSent.encode(), vec![0x1a, 0x00]);
        // hello: version (field 1, varint) = 1.
        assert_eq!(encode_hello(), vec![0x08, 0x01]);
        // ack with an error: field 1 (len) holding field 1 (len) "no".
        assert_eq!(
            encode_response(&Err("no".into())),
            vec![0x0a, 0x04, 0x0a, 0x02, b'n', b'o']
        );
        // a positive ack is an empty Ack message.
        assert_eq!(encode_response(&Ok(())), vec![0x0a, 0x00]);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let add = Request::Add {
            uid: "u1".into(),
            info: info(),
        }
        .encode();
        assert_eq!(
            Request::decode(&add, 0),
            Err(CodecError::AddFds {
                uid: "u1".into(),
                fds: 0
            })
        );
        assert_eq!(
            Request::decode(&add, 2),
            Err(CodecError::AddFds {
                uid: "u1".into(),
                fds: 2
            })
        );
        let no_info = WorkloadRequest {
            payload: Some(Req::Add(AddWorkload {
                uid: "u2".into(),
                workload_info: None,
            })),
        }
        .encode_to_vec();
        assert_eq!(
            Request::decode(&no_info, 1),
            Err(CodecError::AddWithoutInfo { uid: "u2".into() })
        );
        let keep = Request::Keep { uid: "u1".into() }.encode();
        assert_eq!(
            Request::decode(&keep, 1),
            Err(CodecError::UnexpectedFds {
                what: "keep",
                fds: 1
            })
        );
        assert_eq!(
            Request::decode(&Request::Del { uid: String::new() }.encode(), 0),
            Err(CodecError::EmptyUid)
        );
        assert_eq!(Request::decode(&[], 0), Err(CodecError::Empty));
        assert!(matches!(
            Request::decode(&[0xff, 0xff, 0xff], 0),
            Err(CodecError::Malformed(_))
        ));
        assert_eq!(
            Request::decode(&[0u8; 1024], 0),
            Err(CodecError::TooLarge(1024))
        );
        assert_eq!(decode_hello(&[0x08, 0x02]), Err(CodecError::Version(2)));
        assert!(decode_hello(&encode_hello()).is_ok());
    }

    #[test]
    fn responses_round_trip_and_long_reasons_are_cut() {
        assert_eq!(decode_response(&encode_response(&Ok(()))).unwrap(), Ok(()));
        assert_eq!(
            decode_response(&encode_response(&Err("nope".into()))).unwrap(),
            Err("nope".into())
        );
        let long = encode_response(&Err("x".repeat(5000)));
        assert!(long.len() < MAX_MESSAGE);
        assert!(decode_response(&long).unwrap().is_err());
        // Found by fuzzing: reasons of wide characters were cut by characters and
        // still did not fit; an empty reason read as a positive ack.
        for wide in ["é", "\u{fffd}", "🦀"] {
            let long = encode_response(&Err(wide.repeat(600)));
            assert!(long.len() < MAX_MESSAGE, "{wide}: {} bytes", long.len());
            let Err(reason) = decode_response(&long).unwrap() else {
                panic!("a refusal read as an ack")
            };
            assert!(wide.repeat(600).starts_with(&reason));
        }
        assert_eq!(
            decode_response(&encode_response(&Err(String::new()))).unwrap(),
            Err("refused".into())
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 1u64;
        for len in 0..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 33) as u8
                })
                .collect();
            let _ = Request::decode(&buf, 0);
            let _ = decode_response(&buf);
            let _ = decode_hello(&buf);
        }
    }
}
