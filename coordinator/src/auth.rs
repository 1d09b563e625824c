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
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing bearer token (authorization: Bearer <token>)")
            })?;
        if bool::from(given.as_bytes().ct_eq(&self.token)) {
            Ok(req)
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
}
