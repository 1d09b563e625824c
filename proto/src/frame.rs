//! gRPC message framing by hand for the two bulk streams (parameters out of the coordinator,
//! updates into it).
//!
//! tonic's codec copies every message into its encode buffer on the way out, and on the way in
//! gathers the HTTP/2 frames into a decode buffer that is allocated afresh for each message
//! (its memory leaves with the `Bytes` payload): two copies of every payload and fresh pages
//! per megabyte. Here a chunk goes out as two HTTP/2 data frames, a small head (the gRPC
//! prefix, every other field, the payload's key and length) and the payload `Bytes` itself,
//! shared, not copied; coming in, a message that lies within one received frame is decoded as
//! a slice of it, so the payload the reduction reads is the memory the socket was read into.
//!
//! The bytes on the wire are standard gRPC and protobuf (a protobuf message's fields may come
//! in any order), so any gRPC client or server interoperates with these streams.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tonic::Status;

/// The 5-byte prefix of a gRPC message: a compression flag and the big-endian length.
pub const PREFIX: usize = 5;
pub const PULL_PATH: &str = "/capsnet.v1.Coordinator/PullParams";
pub const PUSH_PATH: &str = "/capsnet.v1.Coordinator/PushUpdate";
/// The largest message either side accepts (a chunk is 1 MiB by default).
pub const MAX_MESSAGE: usize = 8 << 20;
pub const GRPC_CONTENT_TYPE: &str = "application/grpc";
/// Field numbers of `ParamChunk.payload` and `UpdateChunk.payload` in capsnet.proto.
pub const PARAM_PAYLOAD_TAG: u32 = 5;
pub const UPDATE_PAYLOAD_TAG: u32 = 6;

/// A small message as one gRPC frame.
pub fn frame<M: Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut b = BytesMut::with_capacity(PREFIX + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    // A BytesMut grows as needed, so encoding cannot run out of room.
    m.encode_raw(&mut b);
    b.freeze()
}

/// A message whose bytes field `tag` is `payload`, as two pieces: the head (the gRPC prefix,
/// every field of `fields`, whose own `tag` field must be empty, then the payload's key and
/// length) and the payload itself.
pub fn frame_with_payload<M: Message>(fields: &M, tag: u32, payload: Bytes) -> [Bytes; 2] {
    let n = payload.len();
    let len = fields.encoded_len() + key_len(tag) + encoded_len_varint(n as u64) + n;
    let mut head = BytesMut::with_capacity(PREFIX + len - n);
    head.put_u8(0);
    head.put_u32(len as u32);
    fields.encode_raw(&mut head);
    encode_key(tag, WireType::LengthDelimited, &mut head);
    encode_varint(n as u64, &mut head);
    [head.freeze(), payload]
}

/// Bytes in received pieces. As a [`Buf`], `copy_to_bytes` of a range within one piece shares
/// it (prost decodes `bytes` fields with it), and only a range across pieces is gathered.
#[derive(Debug, Default)]
pub struct Pieces {
    q: VecDeque<Bytes>,
    len: usize,
}

impl Pieces {
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.q.push_back(b);
        }
    }

    /// The first `n` bytes (at most what is held) as pieces of their own.
    pub fn split_to(&mut self, n: usize) -> Pieces {
        let mut out = Pieces::default();
        while out.len < n {
            let Some(mut front) = self.q.pop_front() else {
                break;
            };
            let want = n - out.len;
            if front.len() > want {
                let rest = front.split_off(want);
                self.q.push_front(rest);
            }
            self.len -= front.len();
            out.push(front);
        }
        out
    }
}

impl Buf for Pieces {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.q.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end");
        self.len -= cnt;
        while cnt > 0 {
            let Some(front) = self.q.front_mut() else {
                break;
            };
            if front.len() > cnt {
                front.advance(cnt);
                break;
            }
            cnt -= front.len();
            self.q.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.len, "copy_to_bytes past the end");
        match self.q.front_mut() {
            Some(front) if front.len() >= len => {
                let b = front.split_to(len);
                if front.is_empty() {
                    self.q.pop_front();
                }
                self.len -= len;
                b
            }
            _ => {
                let mut b = BytesMut::with_capacity(len);
                b.put(Buf::take(&mut *self, len));
                b.freeze()
            }
        }
    }
}

/// Cuts the gRPC messages of a body out of its data frames.
#[derive(Debug)]
pub struct Deframer {
    held: Pieces,
    /// Length of the message whose prefix was read.
    want: Option<usize>,
    max: usize,
}

impl Deframer {
    pub fn new(max: usize) -> Self {
        Deframer {
            held: Pieces::default(),
            want: None,
            max,
        }
    }

    pub fn push(&mut self, data: Bytes) {
        self.held.push(data);
    }

    /// The next whole message, once it is all here.
    pub fn next_message(&mut self) -> Result<Option<Pieces>, Status> {
        if self.want.is_none() {
            if self.held.remaining() < PREFIX {
                return Ok(None);
            }
            if self.held.get_u8() != 0 {
                return Err(Status::unimplemented(
                    "compressed messages are not supported on this stream",
                ));
            }
            let len = self.held.get_u32() as usize;
            if len > self.max {
                return Err(Status::resource_exhausted(format!(
                    "message of {len} bytes exceeds the limit of {} bytes",
                    self.max
                )));
            }
            self.want = Some(len);
        }
        match self.want {
            Some(len) if self.held.remaining() >= len => {
                self.want = None;
                Ok(Some(self.held.split_to(len)))
            }
            _ => Ok(None),
        }
    }

    /// Whether a message was cut off (bytes held, or a prefix read without its message).
    pub fn partial(&self) -> bool {
        self.want.is_some() || self.held.remaining() > 0
    }
}

/// The messages of an HTTP body, decoded as they arrive, then its trailers.
pub struct Messages<B> {
    body: B,
    deframer: Deframer,
    trailers: Option<http::HeaderMap>,
    ended: bool,
}

impl<B> Messages<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(body: B) -> Self {
        Messages {
            body,
            deframer: Deframer::new(MAX_MESSAGE),
            trailers: None,
            ended: false,
        }
    }

    /// The next message, or `None` at the end of the body.
    pub async fn message<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        loop {
            if let Some(bytes) = self.deframer.next_message()? {
                return M::decode(bytes)
                    .map(Some)
                    .map_err(|e| Status::internal(format!("undecodable message: {e}")));
            }
            if self.ended {
                // An error status at the end of a response is the answer, whatever came before.
                if let Some(s) = self.trailers.as_ref().and_then(Status::from_header_map)
                    && s.code() != tonic::Code::Ok
                {
                    return Err(s);
                }
                return if self.deframer.partial() {
                    Err(Status::internal("the stream ended inside a message"))
                } else {
                    Ok(None)
                };
            }
            match self.body.frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => self.deframer.push(data),
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            self.trailers.get_or_insert_default().extend(t);
                        }
                    }
                },
                Some(Err(e)) => return Err(Status::from_error(e.into())),
                None => self.ended = true,
            }
        }
    }

    /// Reads to the end of a response body and returns its status: the error it carries, or
    /// an error when it carries none.
    pub async fn status(&mut self) -> Result<(), Status> {
        let trailers = self.trailers().await?;
        match trailers.and_then(Status::from_header_map) {
            Some(s) if s.code() == tonic::Code::Ok => Ok(()),
            Some(s) => Err(s),
            None => Err(Status::internal("the response ended without a gRPC status")),
        }
    }

    /// Reads to the end of the body and returns its trailers.
    pub async fn trailers(&mut self) -> Result<Option<&http::HeaderMap>, Status> {
        while !self.ended {
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(t) = f.into_trailers() {
                        self.trailers.get_or_insert_default().extend(t);
                    }
                }
                Some(Err(e)) => return Err(Status::from_error(e.into())),
                None => self.ended = true,
            }
        }
        Ok(self.trailers.as_ref())
    }
}

/// The bulk RPCs of a reducer served in the same process as a worker (`capsnet worker
/// --serve-reducer`), called without a socket: the request and response bodies are handed
/// over as they are, so the worker's own span crosses no kernel and no HTTP/2 framing. The
/// token, the checks and the answers are those of a call over the network.
#[derive(Clone)]
pub struct InProcess {
    /// The URL the reducer advertises: work orders name its span's owner by it.
    pub url: String,
    call: std::sync::Arc<dyn Fn(http::Request<tonic::body::Body>) -> ResponseFuture + Send + Sync>,
}

/// The answer to an in-process call.
pub type ResponseFuture =
    std::pin::Pin<Box<dyn Future<Output = http::Response<tonic::body::Body>> + Send + 'static>>;

impl InProcess {
    pub fn new(
        url: String,
        call: impl Fn(http::Request<tonic::body::Body>) -> ResponseFuture + Send + Sync + 'static,
    ) -> Self {
        InProcess {
            url,
            call: std::sync::Arc::new(call),
        }
    }

    pub fn call(&self, req: http::Request<tonic::body::Body>) -> ResponseFuture {
        (self.call)(req)
    }
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess").field("url", &self.url).finish()
    }
}

/// Where a reducer started in this process leaves its [`InProcess`] handle while it serves
/// (empty before it has its span and after it stopped), for the worker beside it to find.
#[derive(Clone, Debug, Default)]
pub struct LocalReducer(std::sync::Arc<std::sync::RwLock<Option<InProcess>>>);

impl LocalReducer {
    pub fn set(&self, handle: Option<InProcess>) {
        if let Ok(mut h) = self.0.write() {
            *h = handle;
        }
    }

    /// The handle of the reducer serving now, if it advertises `url`.
    pub fn get(&self, url: &str) -> Option<InProcess> {
        let h = self.0.read().ok()?;
        h.as_ref().filter(|h| h.url == url).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    fn chunk(payload: &[u8]) -> pb::UpdateChunk {
        pb::UpdateChunk {
            worker_id: "w-1".into(),
            round: 7,
            offset: 1 << 20,
            total_len: 8_215_568,
            encoding: 2,
            payload: Bytes::copy_from_slice(payload),
            crc32: 0xDEAD_BEEF,
            samples: 16,
            layout_hash: 42,
            total_crc32: Some(3),
            loss: 0.25,
            layout: 2,
            shm: None,
        }
    }

    /// The two pieces are a standard gRPC message: prost decodes it to the same value.
    #[test]
    fn head_and_payload_frame_a_standard_message() {
        let want = chunk(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut fields = want.clone();
        let payload = std::mem::take(&mut fields.payload);
        let [head, body] = frame_with_payload(&fields, UPDATE_PAYLOAD_TAG, payload.clone());
        assert_eq!(
            body.as_ptr(),
            payload.as_ptr(),
            "the payload is shared, not copied"
        );
        let mut whole = head.to_vec();
        whole.extend_from_slice(&body);
        assert_eq!(whole[0], 0);
        let len = u32::from_be_bytes([whole[1], whole[2], whole[3], whole[4]]) as usize;
        assert_eq!(len, whole.len() - PREFIX);
        assert_eq!(pb::UpdateChunk::decode(&whole[PREFIX..]).unwrap(), want);
        // And tonic's own framing of the same message decodes the same.
        assert_eq!(
            pb::UpdateChunk::decode(&frame(&want)[PREFIX..]).unwrap(),
            want
        );
    }

    /// The payload tags are the field numbers of the generated messages.
    #[test]
    fn payload_tags_match_the_proto() {
        let key = |tag: u32| ((tag << 3) | 2) as u8;
        let p = pb::ParamChunk {
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        };
        assert_eq!(p.encode_to_vec()[0], key(PARAM_PAYLOAD_TAG));
        let u = pb::UpdateChunk {
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        };
        assert_eq!(u.encode_to_vec()[0], key(UPDATE_PAYLOAD_TAG));
    }

    /// Messages come out whole however the bytes are cut into frames, and a payload that lies
    /// within one frame is a slice of that frame.
    #[test]
    fn deframing_survives_any_split_and_shares_whole_payloads() {
        let msgs: Vec<pb::UpdateChunk> = (0..4u8)
            .map(|i| chunk(&vec![i; 100 + i as usize * 37]))
            .collect();
        let mut wire = vec![];
        for m in &msgs {
            let mut f = m.clone();
            let p = std::mem::take(&mut f.payload);
            wire.extend(frame_with_payload(&f, UPDATE_PAYLOAD_TAG, p));
        }
        // As sent: head and payload frames.
        let mut d = Deframer::new(MAX_MESSAGE);
        let mut got = vec![];
        for w in &wire {
            d.push(w.clone());
            while let Some(p) = d.next_message().unwrap() {
                got.push(pb::UpdateChunk::decode(p).unwrap());
            }
        }
        assert_eq!(got, msgs);
        assert!(!d.partial());
        for (m, w) in got.iter().zip(wire.chunks(2)) {
            assert_eq!(m.payload.as_ptr(), w[1].as_ptr(), "payload was copied");
        }
        // Re-cut into frames of every size from 1 byte up.
        let all: Vec<u8> = wire.iter().flat_map(|b| b.to_vec()).collect();
        for size in [1, 2, 3, 5, 7, 64, 1000, all.len()] {
            let mut d = Deframer::new(MAX_MESSAGE);
            let mut got = vec![];
            for piece in all.chunks(size) {
                d.push(Bytes::copy_from_slice(piece));
                while let Some(p) = d.next_message().unwrap() {
                    got.push(pb::UpdateChunk::decode(p).unwrap());
                }
            }
            assert_eq!(got, msgs, "frames of {size} bytes");
            assert!(!d.partial());
        }
    }

    #[test]
    fn oversized_compressed_and_cut_off_messages_are_refused() {
        let mut d = Deframer::new(16);
        d.push(Bytes::from_static(&[0, 0, 0, 0, 17]));
        let e = d.next_message().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("17 bytes"), "{}", e.message());

        let mut d = Deframer::new(16);
        d.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert_eq!(
            d.next_message().unwrap_err().code(),
            tonic::Code::Unimplemented
        );

        let mut d = Deframer::new(16);
        d.push(Bytes::from_static(&[0, 0, 0, 0, 4, 1, 2]));
        assert!(d.next_message().unwrap().is_none());
        assert!(d.partial());
    }
}
