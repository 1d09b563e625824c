//! Bearer-token authentication for every RPC, compared in constant time.

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// A tonic interceptor that accepts `authorization: Bearer <token>` and nothing else.
#[derive(Clone)]
pub struct TokenCheck {
    token: std::sync::Arc<Vec<u8>>,
}

impl TokenCheck {
    pub fn new(token: &str) -> Self {
        TokenCheck {
            token: std::sync::Arc::new(token.as_bytes().to_vec()),
        }
    }

    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        self.verify(req.metadata().get("authorization").map(|v| v.as_bytes()))?;
        Ok(req)
    }

    /// The same check on the headers of a request served without tonic's router.
    pub fn check_headers(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        self.verify(headers.get("authorization").map(|v| v.as_bytes()))
    }

    fn verify(&self, authorization: Option<&[u8]>) -> Result<(), Status> {
        let given = authorization
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing bearer token (authorization: Bearer <token>)")
            })?;
        if bool::from(given.ct_eq(&self.token)) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_passes() {
        let t = TokenCheck::new("s3cret-token-0123456789");
        let mut r = Request::new(());
        r.metadata_mut().insert(
            "authorization",
            "Bearer s3cret-token-0123456789".parse().unwrap(),
        );
        assert!(t.check(r).is_ok());
        for bad in [
            "Bearer s3cret-token-012345678",
            "s3cret-token-0123456789",
            "Bearer ",
        ] {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert("authorization", bad.parse().unwrap());
            assert_eq!(t.check(r).unwrap_err().code(), tonic::Code::Unauthenticated);
        }
        assert_eq!(
            t.check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    /// The check of the data plane's requests, on raw HTTP headers.
    #[test]
    fn raw_headers_pass_only_with_the_exact_token() {
        let t = TokenCheck::new("s3cret-token-0123456789");
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("authorization", v.parse().unwrap());
            h
        };
        assert!(
            t.check_headers(&with("Bearer s3cret-token-0123456789"))
                .is_ok()
        );
        for bad in [
            "Bearer s3cret-token-012345678X",
            "Basic s3cret-token-0123456789",
        ] {
            let e = t.check_headers(&with(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        let e = t.check_headers(&http::HeaderMap::new()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            e.message().contains("missing bearer token"),
            "{}",
            e.message()
        );
    }
}
