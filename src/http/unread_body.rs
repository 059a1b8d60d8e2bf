//! Keeps every request's body stream alive until its response is sent.
//!
//! Why: when a handler answers without reading a chunked body to its end (an unknown channel,
//! a refusal, a body too large or too slow, `/healthz`), actix-http keeps the connection open to
//! drain the rest after the response, and nothing bounds that wait: a client that sends
//! `Transfer-Encoding: chunked` and then nothing holds a connection forever. A body stream
//! still held when the response has gone out makes actix close the connection instead (after
//! `Connection: close` and its one-second linger). A body read to its end changes nothing: by
//! then actix has let go of it, and the connection is kept alive as before.

use super::stalled_connections::{ConnectionWatch, InProgress};
use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse};
use actix_web::web::Bytes;
use actix_web::HttpMessage;
use futures_util::Stream;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// A request's body, read by its handler through [`SharedBody`] and held by its response's
/// body ([`HoldingBody`]).
type Body = Rc<RefCell<Payload>>;

/// The handler's view of the body.
struct SharedBody(Body);

impl Stream for SharedBody {
    type Item = Result<Bytes, actix_web::error::PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Only ever borrowed here: the response's hold never reads it.
        Pin::new(&mut *self.0.borrow_mut()).poll_next(cx)
    }
}

/// A response body that holds the request's body until it is dropped: after its last byte is
/// written, once actix has decided whether the connection stays open.
pub struct HoldingBody<B> {
    inner: B,
    _request_body: Body,
    /// The request counts as in progress on its connection until then (see
    /// `stalled_connections`).
    _in_progress: Option<InProgress>,
}

impl<B: MessageBody + Unpin> MessageBody for HoldingBody<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// Middleware (`App::wrap_fn`): see the module docs.
pub fn keep_body_until_sent<S, B>(
    mut request: ServiceRequest,
    service: &S,
) -> impl Future<Output = Result<ServiceResponse<HoldingBody<B>>, actix_web::Error>> + 'static
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    S::Future: 'static,
{
    let in_progress = request.conn_data::<ConnectionWatch>().map(ConnectionWatch::begin_request);
    let body: Body = Rc::new(RefCell::new(request.take_payload()));
    let shared: Pin<Box<dyn Stream<Item = Result<Bytes, actix_web::error::PayloadError>>>> =
        Box::pin(SharedBody(body.clone()));
    request.set_payload(Payload::from(shared));
    let response = service.call(request);
    async move {
        let response = response.await?;
        Ok(response.map_body(|_, inner| HoldingBody { inner, _request_body: body, _in_progress: in_progress }))
    }
}
