//! Finished futures for pmcp's middleware hooks.
//!
//! pmcp's `AdvancedMiddleware` is an `async_trait`: every hook returns a
//! boxed future, and its chain calls `should_execute`, `on_chain_start` and
//! `on_chain_complete` of every middleware on every request. Their default
//! bodies are `async`, so each call allocates a future to say `true` or
//! `Ok(())`. The futures here are ready at once and zero-sized, so boxing
//! one allocates nothing; [`chain_hooks!`] writes the three hooks with them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The boxed future a pmcp hook returns.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A hook's result, known when the hook was called: `Ok(())` is a
/// zero-sized future, which boxing does not allocate.
pub(crate) fn finished(result: pmcp::Result<()>) -> BoxFuture<'static, pmcp::Result<()>> {
    match result {
        Ok(()) => Box::pin(GoOn),
        Err(error) => Box::pin(std::future::ready(Err(error))),
    }
}

/// A future that is ready at once with `Ok(())`.
pub(crate) struct GoOn;

impl Future for GoOn {
    type Output = pmcp::Result<()>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<pmcp::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A future that is ready at once with `true`.
pub(crate) struct Yes;

impl Future for Yes {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<bool> {
        Poll::Ready(true)
    }
}

/// Writes, inside an `#[async_trait] impl AdvancedMiddleware`, the three
/// hooks pmcp's chain calls on every request with pmcp's default answers
/// (`should_execute` is `true`, the chain hooks are `Ok(())`), without the
/// allocation the defaults make.
macro_rules! chain_hooks {
    () => {
        fn should_execute<'life0, 'life1, 'async_trait>(
            &'life0 self,
            _context: &'life1 ::pmcp::shared::MiddlewareContext,
        ) -> $crate::hooks::BoxFuture<'async_trait, bool>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            Self: 'async_trait,
        {
            ::std::boxed::Box::pin($crate::hooks::Yes)
        }

        $crate::hooks::chain_hooks!(@go_on on_chain_start);
        $crate::hooks::chain_hooks!(@go_on on_chain_complete);
    };
    (@go_on $hook:ident) => {
        fn $hook<'life0, 'life1, 'async_trait>(
            &'life0 self,
            _context: &'life1 ::pmcp::shared::MiddlewareContext,
        ) -> $crate::hooks::BoxFuture<'async_trait, ::pmcp::Result<()>>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            Self: 'async_trait,
        {
            ::std::boxed::Box::pin($crate::hooks::GoOn)
        }
    };
}
pub(crate) use chain_hooks;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_finished_futures_are_zero_sized_and_ready() {
        let yes: BoxFuture<'_, bool> = Box::pin(Yes);
        assert_eq!(std::mem::size_of_val(&*yes), 0);
        assert!(yes.await);
        let ok = finished(Ok(()));
        assert_eq!(std::mem::size_of_val(&*ok), 0);
        assert!(ok.await.is_ok());
        let err = finished(Err(pmcp::Error::RateLimited));
        assert!(matches!(err.await, Err(pmcp::Error::RateLimited)));
    }
}
