//! SoftHSM2 provisioning, the embedded default HSM: a private token
//! directory and config file, token initialisation, and the fault the tests
//! and the demo need (closing every session of a token, as a token reset or
//! a network-HSM failover does).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use cryptoki::{session::UserType, types::AuthPin};

use crate::{
    error::{HsmError, Result},
    token::{module_context, Token},
};

/// A SoftHSM2 configuration of our own: `dir/softhsm2.conf` pointing at
/// `dir/tokens`. SoftHSM reads it from `SOFTHSM2_CONF` at C_Initialize.
#[derive(Clone, Debug)]
pub struct SoftHsmDir {
    pub dir: PathBuf,
}

impl SoftHsmDir {
    /// Creates (or reuses) the directory and writes the config file.
    pub fn create(dir: &Path) -> Result<SoftHsmDir> {
        let io = |e: std::io::Error| HsmError::Invalid(format!("{}: {e}", dir.display()));
        fs::create_dir_all(dir.join("tokens")).map_err(io)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        let conf = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
             slots.removable = false\n",
            dir.join("tokens").display()
        );
        fs::write(dir.join("softhsm2.conf"), conf).map_err(io)?;
        Ok(SoftHsmDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }
}

/// Initialises a new token labelled `label` in SoftHSM's free slot, with an
/// SO PIN and a user PIN. The module must already be configured (for
/// SoftHSM, `SOFTHSM2_CONF` set before the first use in this process).
pub fn init_token(module: &Path, label: &str, so_pin: &str, user_pin: &str) -> Result<()> {
    // Token initialisation changes the slot list; one at a time, and never
    // beside a slot-list scan.
    let _g = crate::token::slot_list_lock();
    let ctx = module_context(module)?;
    let e = |op: &str, err| HsmError::pkcs11(label, op, err);
    let slots = ctx.get_all_slots().map_err(|x| e("C_GetSlotList", x))?;
    let mut free = None;
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|x| e("C_GetTokenInfo", x))?;
        if info.token_initialized() {
            if info.label().trim_end() == label {
                return Err(HsmError::Invalid(format!(
                    "a token labelled {label:?} exists"
                )));
            }
        } else if free.is_none() {
            free = Some(slot);
        }
    }
    let slot = free.ok_or_else(|| HsmError::Invalid("no free slot to initialise".into()))?;
    let so = AuthPin::from(so_pin.to_string());
    ctx.init_token(slot, &so, label)
        .map_err(|x| e("C_InitToken", x))?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|x| e("C_OpenSession", x))?;
    session
        .login(UserType::So, Some(&so))
        .map_err(|x| e("C_Login(SO)", x))?;
    session
        .init_pin(&AuthPin::from(user_pin.to_string()))
        .map_err(|x| e("C_InitPIN", x))?;
    session.logout().map_err(|x| e("C_Logout", x))?;
    Ok(())
}

/// C_CloseAllSessions on the token's slot: every session of this process on
/// it becomes invalid and the login state is lost, exactly what a token
/// reset or an HSM failover does to a running signer.
pub fn close_all_sessions(token: &Token) -> Result<()> {
    let module = &token.config().module;
    // SAFETY: loading the same module again only takes another reference to
    // the already-loaded library (dlopen is refcounted); no initialiser of
    // ours runs.
    let lib = unsafe { cryptoki_sys::Pkcs11::new(module) }.map_err(|e| HsmError::Module {
        path: module.display().to_string(),
        reason: e.to_string(),
    })?;
    if lib.C_CloseAllSessions.is_err() {
        return Err(HsmError::Invalid("module has no C_CloseAllSessions".into()));
    }
    // SAFETY: the symbol is present (checked above), the module is
    // initialised (the token was opened through it) and the slot id came
    // from the module itself.
    let rv = unsafe { lib.C_CloseAllSessions(token.slot().id()) };
    if rv != 0 {
        return Err(HsmError::Invalid(format!(
            "C_CloseAllSessions returned {rv:#x}"
        )));
    }
    Ok(())
}
