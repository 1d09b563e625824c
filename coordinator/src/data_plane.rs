//! The two bulk RPCs, PullParams and PushUpdate, served ahead of tonic's generated router with
//! messages framed by hand ([`capsnet_proto::frame`]): a parameter chunk leaves as its small
//! head and the round's shared payload, and an update chunk's payload is the memory its HTTP/2
//! frame was read into, so no payload passes through a codec buffer. Every other path goes to
//! the router. Same wire format, same token check, same status codes.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use capsnet_proto::frame::{self, Messages, PULL_PATH, PUSH_PATH};
use capsnet_proto::pb;
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::StreamBody;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::auth::TokenCheck;
use crate::service::Service;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Routes the bulk RPCs to [`Service`] and everything else to `inner`.
#[derive(Clone)]
pub(crate) struct DataPlane<S> {
    pub inner: S,
    pub svc: Service,
    pub auth: TokenCheck,
}

impl<S: NamedService> NamedService for DataPlane<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower_service::Service<http::Request<Body>> for DataPlane<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<B>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path();
        if path == PULL_PATH || path == PUSH_PATH {
            let (svc, auth) = (self.svc.clone(), self.auth.clone());
            Box::pin(async move {
                Ok(serve(svc, auth, req)
                    .await
                    .unwrap_or_else(Status::into_http))
            })
        } else {
            let routed = self.inner.call(req);
            Box::pin(async move { Ok(routed.await?.map(Body::new)) })
        }
    }
}

/// A gRPC response whose body is `frames` followed by an OK status.
fn respond(frames: Vec<Bytes>) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
    let body = futures_util::stream::iter(frames)
        .map(|b| Ok::<_, Status>(Frame::data(b)))
        .chain(futures_util::stream::once(async {
            Ok(Frame::trailers(trailers))
        }));
    let mut resp = http::Response::new(Body::new(StreamBody::new(body)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(frame::GRPC_CONTENT_TYPE),
    );
    resp
}

async fn serve(
    svc: Service,
    auth: TokenCheck,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    auth.check_headers(req.headers())?;
    let pull = req.uri().path() == PULL_PATH;
    let mut msgs = Messages::new(req.into_body());
    if pull {
        let r: pb::PullRequest = msgs
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty pull request"))?;
        let (order, snapshot) = svc.pull(r).await?;
        let mut order = Some(order);
        let frames = snapshot
            .chunks
            .iter()
            .flat_map(|c| {
                let fields = pb::ParamChunk {
                    round: snapshot.round,
                    offset: c.offset,
                    total_len: snapshot.total_len,
                    encoding: snapshot.encoding as i32,
                    payload: Bytes::new(),
                    crc32: c.crc32,
                    work: order.take(),
                    total_crc32: c.total_crc32,
                };
                frame::frame_with_payload(&fields, frame::PARAM_PAYLOAD_TAG, c.payload.clone())
            })
            .collect();
        Ok(respond(frames))
    } else {
        let out = svc.push(&mut msgs).await?;
        Ok(respond(vec![frame::frame(&out)]))
    }
}
